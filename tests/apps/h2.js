// An HTTP/2 (cleartext) server through the compatibility API: /fail
// answers 500, anything else 200.
const http2 = require('http2');

http2
  .createServer((req, res) => {
    res.writeHead(req.url === '/fail' ? 500 : 200);
    res.end('h2\n');
  })
  .listen(8000);
