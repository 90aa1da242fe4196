// An app as PM2 users write it: it listens on its own port (PORT), with no
// socket handed over; answers with its instance and pid. LISTEN_AFTER_MS
// delays its listen (an app that loads for a while first).
const http = require('http');

const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE ?? null, pid: process.pid }) + '\n');
});
setTimeout(() => server.listen(Number(process.env.PORT)), Number(process.env.LISTEN_AFTER_MS) || 0);
