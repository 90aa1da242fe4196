// Listens on its main port and on more: an admin port every worker shares
// (listen(0): one ephemeral port for all, as Node's cluster gives), a
// metrics socket of its own per instance (METRICS_DIR/metrics.N), and, when
// TAKEN_PORT is set, a port something else holds: that error is the app's.
const http = require('http');

const instance = process.env.NODE_APP_INSTANCE;
const answer = (via) => (req, res) => res.end(JSON.stringify({ instance, pid: process.pid, via, admin_port: admin.address() && admin.address().port }));
// The main port first: the first TCP listen takes the handed-over socket.
http.createServer(answer('main')).listen(8000);
const admin = http.createServer(answer('admin'));
admin.listen(0);
if (process.env.METRICS_DIR) http.createServer(answer('metrics')).listen(`${process.env.METRICS_DIR}/metrics.${instance}`);
if (process.env.TAKEN_PORT) {
  const taken = http.createServer(answer('taken'));
  taken.on('error', (e) => console.error(`taken port: ${e.code} ${e.syscall} ${e.message}`));
  taken.listen(Number(process.env.TAKEN_PORT), '127.0.0.1');
}
