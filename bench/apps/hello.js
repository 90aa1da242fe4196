// Hello world: answers every request with the worker's NODE_APP_INSTANCE and pid.
// Listens on $PORT (default 8000); under nodeherd the preload maps it onto the
// inherited socket, under PM2 and node's cluster the port is bound as usual.
// No SIGINT handler: what happens to requests in flight on stop is up to the
// process manager.
const hit = require('./count');
const http = require('http');

const body = JSON.stringify({ instance: process.env.NODE_APP_INSTANCE ?? null, pid: process.pid });
http
  .createServer((req, res) => {
    hit();
    res.setHeader('content-type', 'application/json');
    res.end(body);
  })
  .listen(Number(process.env.PORT) || 8000);
