// Forks a helper (child_process.fork) that listens on a port of its own and
// tells its parent which; the app reports the helper's pid and port. It
// listens once the helper has told its port, so every answer names one
// (on a loaded machine the helper may take longer to start than the app).
const http = require('node:http');
const path = require('node:path');
const { fork } = require('node:child_process');

const helper = fork(path.join(__dirname, 'helper.js'));
let helperPort = null;
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({
    instance: process.env.NODE_APP_INSTANCE,
    pid: process.pid,
    node: process.version,
    helper: { pid: helper.pid, port: helperPort },
  }));
});
helper.on('message', (msg) => {
  if (!msg || !msg.port || helperPort) return;
  helperPort = msg.port;
  server.listen(3000);
});
