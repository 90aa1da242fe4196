// An ES module app.
import http from 'node:http';

http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, via: 'esm' })))
  .listen(8000);
