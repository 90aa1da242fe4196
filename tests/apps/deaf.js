// Instance 0 stops reading its IPC channel for a while (its event loop is
// blocked), while instance 1 makes the manager send it many messages (every
// connection count it reports changes instance 0's fair share). Instance 0
// then reports the shares it read; a torn or glued line would have thrown.
const http = require('http');

const instance = process.env.NODE_APP_INSTANCE;
const BLOCK_MS = Number(process.env.BLOCK_MS || 6000);
const REPORTS = Number(process.env.REPORTS || 1500);
let shares = 0;
let last = null;
process.on('internalMessage', (msg) => {
  if (msg && msg.cmd === 'NODE_NODEHERD_SHARE') {
    shares += 1;
    last = msg.max;
  }
});
process.on('uncaughtException', (e) => {
  console.log(`uncaught: ${e && e.name}: ${e && e.message}`);
  process.exit(70);
});

http
  .createServer((req, res) => res.end(JSON.stringify({ instance, pid: process.pid })))
  .listen(8000, () => {
    if (instance === '0') {
      setTimeout(() => {
        console.log('deaf: blocking');
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, BLOCK_MS);
        console.log('deaf: reading again');
        setTimeout(() => console.log(`deaf: read ${shares} share(s), last ${last}`), 1500);
      }, 500);
    } else {
      setTimeout(() => {
        // Each report raises the total, so the fair share changes each time.
        for (let i = 1; i <= REPORTS; i++) process.send({ nodeherd: 'conns', open: 1000 + 2 * i });
        console.log(`sent ${REPORTS} reports, last ${1000 + 2 * REPORTS}`);
      }, 1500);
    }
  });
