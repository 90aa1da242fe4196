// Instance 1 always crashes at once; the others serve.
const http = require('http');

if (process.env.NODE_APP_INSTANCE === '1') {
  console.error('instance 1 crashing on purpose');
  process.exit(3);
}
http.createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid }))).listen(8000);
