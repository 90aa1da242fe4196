// Serves normally, unless the file named by GATE_FILE exists when it starts:
// then it never listens (GATE_MODE=hang) or crashes (GATE_MODE=crash).
// Lets a test make every replacement of a reload fail.
const http = require('http');
const fs = require('fs');

const gated = process.env.GATE_FILE && fs.existsSync(process.env.GATE_FILE);
if (gated && process.env.GATE_MODE === 'crash') {
  console.error('gated: crashing');
  process.exit(4);
}
if (gated) {
  console.error('gated: never listening');
  setInterval(() => {}, 1000);
} else {
  http
    .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid })))
    .listen(8000);
}
