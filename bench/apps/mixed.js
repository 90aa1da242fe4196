// Fast and slow requests mixed, as real apps have them: `/slow` burns
// SLOW_MS (40) ms of CPU (a report, a big JSON, a template render, a sync
// crypto call), `/hang` never returns (a handler stuck in a loop), and
// anything else answers at once.
const hit = require('./count');
const http = require('http');

const slowMs = Number(process.env.SLOW_MS) || 40;
const body = JSON.stringify({ instance: process.env.NODE_APP_INSTANCE ?? null, pid: process.pid });
http
  .createServer((req, res) => {
    hit();
    if (req.url === '/slow') {
      const end = Date.now() + slowMs;
      while (Date.now() < end);
    } else if (req.url === '/hang') {
      for (;;);
    }
    res.setHeader('content-type', 'application/json');
    res.end(body);
  })
  .listen(Number(process.env.PORT) || 8000);
