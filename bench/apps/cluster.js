// The baseline: a hand-written Node cluster with round-robin off
// (SCHED_NONE), so every worker accepts on the one shared listening socket
// itself, the primary stays off the data path. This is the limit a process
// manager that hands the socket to its workers can reach.
//
//   node cluster.js APP.js N
//
// Workers get NODE_APP_INSTANCE 0..N-1. A worker that dies is forked again in
// its slot. SIGHUP: a naive rolling restart, one worker at a time (fork the
// replacement, wait until it listens, SIGINT the old one, wait for its exit);
// prints "reloaded" when done. SIGTERM/SIGINT: SIGKILL every worker and exit.
const cluster = require('cluster');
const path = require('path');

cluster.schedulingPolicy = cluster.SCHED_NONE;
const [script, n] = process.argv.slice(2);
const count = Number(n);
if (!script || !(count > 0)) {
  console.error('usage: node cluster.js APP.js N');
  process.exit(2);
}
cluster.setupPrimary({ exec: path.resolve(script) });

const slots = new Array(count).fill(null);
let stopping = false;

function fork(i) {
  const w = cluster.fork({ NODE_APP_INSTANCE: String(i) });
  slots[i] = w;
  w.on('exit', () => {
    if (stopping || slots[i] !== w) return;
    fork(i);
  });
  return w;
}

for (let i = 0; i < count; i++) fork(i);

let reloading = false;
async function reload() {
  if (reloading) return;
  reloading = true;
  for (let i = 0; i < count && !stopping; i++) {
    const old = slots[i];
    const fresh = cluster.fork({ NODE_APP_INSTANCE: String(i) });
    await new Promise((resolve) => {
      fresh.once('listening', resolve);
      fresh.once('exit', resolve);
    });
    slots[i] = fresh;
    fresh.on('exit', () => {
      if (!stopping && slots[i] === fresh) fork(i);
    });
    if (old && !old.isDead()) {
      const gone = new Promise((resolve) => old.once('exit', resolve));
      old.process.kill('SIGINT');
      const timer = setTimeout(() => old.process.kill('SIGKILL'), 1600);
      await gone;
      clearTimeout(timer);
    }
  }
  reloading = false;
  console.log('reloaded');
}

process.on('SIGHUP', reload);
const stop = () => {
  stopping = true;
  for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
  setTimeout(() => process.exit(0), 50);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
