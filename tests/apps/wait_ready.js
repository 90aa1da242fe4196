// wait_ready: listens at once but says 'ready' only after a warm-up
// (WARMUP_MS=never: it never says it, as apps that copy `wait_ready` from
// PM2's docs).
const http = require('http');

let warm = false;
http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, warm })))
  .listen(8000, () => {
    if (process.env.WARMUP_MS === 'never') return;
    setTimeout(() => {
      warm = true;
      process.send('ready');
    }, Number(process.env.WARMUP_MS || 300));
  });
