const http = require('node:http');

http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version }));
}).listen(3000);
