// The app of e2e.sh's root-manager section (p): it serves on the socket
// systemd gives it and then, as a compromised dependency would, asks for a
// privileged port of its own, which the manager binds on a worker's
// request. GET / answers who the worker runs as and what that attempt got.
const http = require('http');
const net = require('net');

let privileged = 'pending';
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ pid: process.pid, uid: process.getuid(), gid: process.getgid(), privileged }) + '\n');
});
// The app's own listen first: the first TCP listen takes systemd's socket.
server.listen(8000, () => {
  const probe = net.createServer();
  probe.on('error', (e) => {
    privileged = e.code || String(e);
  });
  probe.listen(812, '127.0.0.1', () => {
    privileged = 'listening';
  });
});
