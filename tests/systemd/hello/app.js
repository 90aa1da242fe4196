// Stand-in for examples/hello/app.js, used by e2e.sh until that exists: a
// plain Node HTTP server that knows nothing of nodeherd. It listens on port
// 8000 like any app; nodeherd's preload points that at the inherited socket.
'use strict';
const http = require('node:http');

const instance = process.env.NODE_APP_INSTANCE;
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'text/plain');
  res.end(`hello from instance ${instance} pid ${process.pid}\n`);
});
server.listen(8000, () => {
  console.log(`instance ${instance} pid ${process.pid} listening`);
});
