// Writes numbered lines to stdout as fast as it can for LOG_FOR_MS (then
// says on stderr how many it wrote, and serves on), or one every
// LOG_EVERY_MS for ever. Each line is `w<instance> <n> <padding>`, so a
// reader can tell a line from another worker, a line seen twice, a line
// missing and a line cut short. Writes are synchronous and retried on a
// full pipe (EAGAIN), so every counted line was handed to the manager.
const http = require('http');
const fs = require('fs');

const me = process.env.NODE_APP_INSTANCE;
const pad = 'x'.repeat(Number(process.env.LOG_PAD || 60));
const sleeper = new Int32Array(new SharedArrayBuffer(4));

function writeAll(fd, text) {
  const buf = Buffer.from(text);
  let off = 0;
  while (off < buf.length) {
    try {
      off += fs.writeSync(fd, buf, off, buf.length - off);
    } catch (e) {
      if (e.code !== 'EAGAIN') throw e;
      Atomics.wait(sleeper, 0, 0, 1);
    }
  }
}

http.createServer((req, res) => res.end(`${me}\n`)).listen(8000, () => {
  let n = 0;
  if (process.env.LOG_EVERY_MS) {
    const batch = Number(process.env.LOG_BATCH || 1);
    setInterval(() => {
      let text = '';
      for (let i = 0; i < batch; i++) text += `w${me} ${n++} ${pad}\n`;
      writeAll(1, text);
    }, Number(process.env.LOG_EVERY_MS));
    return;
  }
  // Let the other workers start before the race.
  setTimeout(() => {
    const until = Date.now() + Number(process.env.LOG_FOR_MS || 3000);
    while (Date.now() < until) {
      let batch = '';
      for (let i = 0; i < 100; i++) batch += `w${me} ${n++} ${pad}\n`;
      writeAll(1, batch);
    }
    writeAll(2, `done w${me} ${n}\n`);
  }, Number(process.env.LOG_AFTER_MS || 500));
});
