// Serves normally; GET /block makes its event loop spin forever (an endless
// loop in a request handler), so it keeps its socket and answers nothing.
const http = require('http');

http
  .createServer((req, res) => {
    if (req.url === '/block') {
      for (;;) {
        // stuck
      }
    }
    res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid }));
  })
  .listen(8000);
