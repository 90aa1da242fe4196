// A UDP echo server: dgram bind(port) maps to the inherited datagram socket.
const dgram = require('dgram');

const sock = dgram.createSocket('udp4');
sock.on('message', (msg, rinfo) => {
  sock.send(`${process.env.NODE_APP_INSTANCE}:${msg}`, rinfo.port, rinfo.address);
});
sock.bind(9999);
