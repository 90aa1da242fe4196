// The example app of a fleet: it answers with the release it runs (the
// RELEASE file beside it, read once at start, so a new release reaches a
// worker through a reload) and which worker answered.
const fs = require('fs');
const http = require('http');
const path = require('path');

let release = 'unknown';
try {
  release = fs.readFileSync(path.join(__dirname, 'RELEASE'), 'utf8').trim();
} catch (_) {}

http
  .createServer((req, res) => {
    res.setHeader('content-type', 'text/plain');
    res.end(`release=${release} instance=${process.env.NODE_APP_INSTANCE} pid=${process.pid}\n`);
  })
  .listen(8080);
