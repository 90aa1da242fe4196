// Serves normally, unless the file named by GATE_FILE exists when it starts:
// then it never listens (GATE_MODE=hang), crashes (GATE_MODE=crash), or
// waits until the file is gone and then listens (GATE_MODE=wait). Lets a
// test make every replacement of a reload fail, or hold a reload open.
const http = require('http');
const fs = require('fs');

const gate = process.env.GATE_FILE;
const gated = gate && fs.existsSync(gate);
const serve = () =>
  http
    .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid })))
    .listen(8000);
if (gated && process.env.GATE_MODE === 'crash') {
  console.error('gated: crashing');
  process.exit(4);
} else if (gated && process.env.GATE_MODE === 'wait') {
  console.error('gated: waiting for the gate to open');
  const poll = setInterval(() => {
    if (!fs.existsSync(gate)) {
      clearInterval(poll);
      serve();
    }
  }, 20);
} else if (gated) {
  console.error('gated: never listening');
  setInterval(() => {}, 1000);
} else {
  serve();
}
