// Already socket-activation aware: listens on {fd: 3} itself.
const http = require('http');

http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, via: 'fd3' })))
  .listen({ fd: 3 });
