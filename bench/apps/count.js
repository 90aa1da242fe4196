// Per-worker request counter for the fairness measure. When BENCH_COUNT_DIR
// is set, each worker writes its count to BENCH_COUNT_DIR/<pid>.json four times a
// second; the bench reads the files before and after a load run. Costs one
// increment per request and one small write per 250 ms.
const dir = process.env.BENCH_COUNT_DIR;
let count = 0;
if (dir) {
  const fs = require('fs');
  const path = require('path');
  const file = path.join(dir, `${process.pid}.json`);
  // Beside the directory, not in it: readers list the directory.
  const tmp = `${dir.replace(/\/+$/, '')}-${process.pid}.tmp`;
  const write = () => {
    try {
      // Write then rename, so that a reader never sees a half-written file.
      fs.writeFileSync(tmp, JSON.stringify({ instance: process.env.NODE_APP_INSTANCE ?? null, pid: process.pid, count }));
      fs.renameSync(tmp, file);
    } catch (_) {
      // The directory is gone: the bench is over.
    }
  };
  setInterval(write, 250).unref();
  write();
}
module.exports = () => {
  count += 1;
};
