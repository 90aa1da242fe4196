// An HTTP/2 server over TLS, as Node's http2 docs show (core API, 'stream' events).
const http2 = require('node:http2');
const fs = require('node:fs');

const server = http2.createSecureServer({
  key: fs.readFileSync(process.env.TLS_KEY),
  cert: fs.readFileSync(process.env.TLS_CERT),
});
server.on('error', (err) => console.error(err));

server.on('stream', (stream, headers) => {
  stream.respond({
    'content-type': 'application/json',
    ':status': 200,
  });
  stream.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version }));
});

server.listen(3000);
