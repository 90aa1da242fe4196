// Load through the balancer for fleet.sh: CONCURRENCY lanes, each sending
// one GET after another to URL on a keep-alive connection of its own, until
// STOPFILE exists or MAX_SECONDS pass. Every request gets a 10 s timeout.
//
//   node fleet-load.js URL CONCURRENCY STOPFILE MAX_SECONDS OUT
//
// OUT gets one line per request: "<start unix ms> <end unix ms> <result>
// <release>", result being the HTTP status or the error code, release the
// `release=` word of the body ("-" when there is none).
'use strict';
const fs = require('node:fs');
const http = require('node:http');

const [url, concurrency, stopFile, maxSeconds, out] = process.argv.slice(2);
if (!out) {
  console.error('usage: node fleet-load.js URL CONCURRENCY STOPFILE MAX_SECONDS OUT');
  process.exit(2);
}
const deadline = Date.now() + Number(maxSeconds) * 1000;
const fd = fs.openSync(out, 'w');
let stopping = false;

function once(agent) {
  return new Promise((resolve) => {
    const start = Date.now();
    let done = false;
    const finish = (result, release) => {
      if (done) return;
      done = true;
      fs.writeSync(fd, `${start} ${Date.now()} ${result} ${release}\n`);
      resolve();
    };
    const req = http.get(url, { agent }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => {
        const m = /release=(\S+)/.exec(body);
        finish(String(res.statusCode), m ? m[1] : '-');
      });
      res.on('error', (e) => finish(e.code || 'ERESPONSE', '-'));
    });
    req.setTimeout(10000, () => req.destroy(Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' })));
    req.on('error', (e) => finish(e.code || 'EREQUEST', '-'));
  });
}

async function lane() {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  while (!stopping && Date.now() < deadline) {
    await once(agent);
  }
  agent.destroy();
}

const poll = setInterval(() => {
  if (fs.existsSync(stopFile) || Date.now() >= deadline) stopping = true;
}, 50);

Promise.all(Array.from({ length: Number(concurrency) }, lane)).then(() => {
  clearInterval(poll);
  fs.closeSync(fd);
});
