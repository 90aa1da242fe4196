// A worker that asks the manager for listening sockets by fd number, as
// the preload does after a capture in place (`diagnose --then resume`),
// but for fds that were never handed to it: GET /probe answers what came
// back for each (a socket, an error, nothing).
const http = require('http');

const asked = [0, 2, 3, 4, 5, 9, 1000, 2147483647];
http
  .createServer((req, res) => {
    if (req.url !== '/probe') return res.end(JSON.stringify({ pid: process.pid }));
    const got = {};
    const base = 7000000;
    const onMsg = (msg, handle) => {
      if (!msg || msg.cmd !== 'NODE_NODEHERD_BOUND' || msg.id < base) return;
      const fd = asked[msg.id - base];
      got[fd] = handle ? 'socket' : 'error';
      if (handle && typeof handle.close === 'function') handle.close();
    };
    process.on('internalMessage', onMsg);
    asked.forEach((fd, i) => process.send({ nodeherd: 'again', id: base + i, fd }));
    setTimeout(() => {
      process.off('internalMessage', onMsg);
      res.end(JSON.stringify(got));
    }, 1000);
  })
  .listen(8000);
