// The forked helper: an ordinary server on a port of its own.
const http = require('http');

const server = http.createServer((req, res) => res.end(JSON.stringify({ helper: process.pid })));
server.listen(0, '127.0.0.1', () =>
  process.send({
    pid: process.pid,
    port: server.address().port,
    execArgv: process.execArgv,
    nodeherd_vars: Object.keys(process.env).filter((k) => k.startsWith('NODEHERD')),
    listen_pid: process.env.LISTEN_PID || null,
  }),
);
