// Cleartext HTTP/2 (h2c, prior knowledge), as Node's http2 docs show for
// http2.createServer().
const http2 = require('node:http2');

const server = http2.createServer();
server.on('error', (err) => console.error(err));

server.on('stream', (stream, headers) => {
  stream.respond({
    'content-type': 'application/json',
    ':status': 200,
  });
  stream.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version }));
});

server.listen(3000);
