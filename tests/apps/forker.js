// Forks a long-lived child of its own, and reports the child's pid.
const http = require('http');
const { spawn } = require('child_process');

const child = spawn('sleep', ['1000'], { stdio: 'ignore' });
http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, child: child.pid })))
  .listen(8000);
