// The helper: its own small server on a port the kernel picks.
const http = require('node:http');

const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ role: 'helper', pid: process.pid, parent: process.ppid }));
});
server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
