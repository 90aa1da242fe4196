// Reports more keep-alive connections than a u32 sum can hold: every
// instance says it holds 4294967295.
const http = require('http');

http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid })))
  .listen(8000, () => {
    setTimeout(() => {
      process.send({ nodeherd: 'conns', open: 4294967295 });
      console.log('reported 4294967295');
    }, 300);
  });
