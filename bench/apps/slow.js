// A slow starter: takes 400 ms before it listens, and handles SIGINT itself
// with server.close(): stop accepting, exit once every connection is closed.
// (Since Node 19, server.close() also closes idle keep-alive connections at
// once; a client may be sending its next request on one at that moment.)
const hit = require('./count');
const http = require('http');

const body = JSON.stringify({ instance: process.env.NODE_APP_INSTANCE ?? null, pid: process.pid });
const server = http.createServer((req, res) => {
  hit();
  res.setHeader('content-type', 'application/json');
  res.end(body);
});
setTimeout(() => server.listen(Number(process.env.PORT) || 8000), 400);
process.on('SIGINT', () => server.close(() => process.exit(0)));
