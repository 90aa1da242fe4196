// The bundled example: an unmodified Node server. Under nodeherd every
// worker serves on the inherited socket, although the code says 8000.
const http = require('http');

const instance = process.env.NODE_APP_INSTANCE ?? '-';
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'text/plain');
  res.end(`hello from worker ${instance} (pid ${process.pid})\n`);
});

server.listen(process.env.PORT || 8000, () => {
  console.log(`worker ${instance} listening`);
});
