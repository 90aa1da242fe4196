// Instance 1 closes its copy of the inherited socket soon after listening
// (CLOSE_MODE=close, and stays alive) or exits right after being ready
// (CLOSE_MODE=exit). The socket itself must stay open for the others.
const http = require('http');

const server = http.createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid })));
server.listen(8000, () => {
  if (process.env.NODE_APP_INSTANCE !== '1') return;
  setTimeout(() => {
    if (process.env.CLOSE_MODE === 'exit') process.exit(0);
    server.close(() => console.log('closed its copy of the listening socket'));
    setInterval(() => {}, 1000);
  }, 200);
});
