// Runs a program of its own on each request and answers with what that
// program holds open (`readlink` of each of its fds): what a worker's
// descriptors leak to the programs it runs.
const http = require('http');
const { execFileSync } = require('child_process');

http
  .createServer((req, res) => {
    const held = execFileSync('/bin/sh', ['-c', 'for f in /proc/$$/fd/*; do readlink "$f"; done; true']).toString();
    res.end(JSON.stringify({ pid: process.pid, instance: process.env.NODE_APP_INSTANCE, held: held.split('\n').filter(Boolean) }));
  })
  .listen(8000);
