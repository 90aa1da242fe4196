// An app that runs Node's cluster itself: two cluster workers under each
// nodeherd worker, all serving on the socket nodeherd handed over.
const cluster = require('cluster');
const http = require('http');

if (cluster.isPrimary) {
  for (let i = 0; i < 2; i++) cluster.fork();
} else {
  http
    .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, primary: process.ppid })))
    .listen(8000);
}
