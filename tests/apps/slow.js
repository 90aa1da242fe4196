// Takes 400 ms to listen and drains on SIGINT itself (its own handler).
const http = require('http');

const server = http.createServer((req, res) => {
  setTimeout(() => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid })), Number(process.env.DELAY_MS || 0));
});
setTimeout(() => server.listen(8000), Number(process.env.BOOT_MS || 400));
process.on('SIGINT', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
