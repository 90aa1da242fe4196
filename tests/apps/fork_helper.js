// Forks a helper that listens on a port of its own (listen(0)) and tells
// what it sees: nodeherd must stay out of it.
const http = require('http');
const { fork } = require('child_process');

let seen = null;
const helper = fork(`${__dirname}/helper_child.js`);
helper.on('message', (m) => {
  seen = m;
});
http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, helper: seen })))
  .listen(8000);
