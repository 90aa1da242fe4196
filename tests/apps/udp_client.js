// A UDP client (statsd-like): send() binds a socket of its own implicitly;
// it must not take the worker's sockets.
const http = require('http');
const dgram = require('dgram');

http
  .createServer((req, res) => {
    const c = dgram.createSocket('udp4');
    c.on('message', (msg) => {
      c.close();
      res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, echo: String(msg) }));
    });
    c.send(`ping ${process.pid}`, Number(process.env.ECHO_PORT), '127.0.0.1');
  })
  .listen(8000);
