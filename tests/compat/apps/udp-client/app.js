// Each request asks a UDP service (an echo at 127.0.0.1:ECHO_PORT) with
// dgram send() on a socket it never binds, as metrics and DNS clients do.
const http = require('node:http');
const dgram = require('node:dgram');

const echoPort = Number(process.env.ECHO_PORT);

http.createServer((req, res) => {
  const sock = dgram.createSocket('udp4');
  const done = (status, body) => {
    clearTimeout(timer);
    sock.close();
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  const timer = setTimeout(() => done(504, { error: 'no UDP answer within 1 s' }), 1000);
  sock.on('error', (err) => done(502, { error: String(err) }));
  sock.on('message', (msg) => {
    done(200, { instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version, echo: String(msg) });
  });
  sock.send(`ping ${process.pid}`, echoPort, '127.0.0.1');
}).listen(3000);
