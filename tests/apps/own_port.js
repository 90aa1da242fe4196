// An app as PM2 users write it: it listens on its own port (PORT), with no
// socket handed over; answers with its instance and pid.
const http = require('http');

http
  .createServer((req, res) => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE ?? null, pid: process.pid }) + '\n');
  })
  .listen(Number(process.env.PORT));
