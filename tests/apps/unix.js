// Listens on a unix socket path of its own choosing.
const http = require('http');

http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, via: 'unix' })))
  .listen('/tmp/this-app-never-binds-here.sock');
