// Holds ~80 MiB once listening: over a max_memory_restart of 40M.
const http = require('http');

let ballast;
http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid })))
  .listen(8000, () => {
    ballast = Buffer.alloc(80 * 1024 * 1024, 1);
  });
setInterval(() => ballast && ballast[0], 1000);
