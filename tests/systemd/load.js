// Load generator for e2e.sh: CONCURRENCY lanes, each sending one GET after
// another to URL, every request on a new connection (or, with "keepalive",
// on one persistent connection per lane). Runs until STOPFILE exists or
// MAX_SECONDS pass, lets requests in flight finish (each has a 20 s timeout),
// then exits. A request that never gets an answer counts as ETIMEDOUT.
//
//   node load.js URL CONCURRENCY STOPFILE MAX_SECONDS OUT [keepalive]
//
// OUT gets one line per request: "<unix seconds> <result> <pid> [detail]",
// result being the HTTP status or the error code (ECONNREFUSED, ECONNRESET,
// ETIMEDOUT, ...), pid the worker pid found in the body ("pid N") or "-".
// A failed request on a reused keep-alive connection gets the detail
// "reused-after:<Connection header of the previous answer on it>".
'use strict';
const fs = require('node:fs');
const http = require('node:http');

const [url, concurrency, stopFile, maxSeconds, out, mode] = process.argv.slice(2);
if (!out) {
  console.error('usage: node load.js URL CONCURRENCY STOPFILE MAX_SECONDS OUT [keepalive]');
  process.exit(2);
}
const keepAlive = mode === 'keepalive';
const deadline = Date.now() + Number(maxSeconds) * 1000;
const fd = fs.openSync(out, 'w');
let stopping = false;

function record(result, pid, detail) {
  fs.writeSync(fd, `${(Date.now() / 1000).toFixed(3)} ${result} ${pid}${detail ? ' ' + detail : ''}\n`);
}

function once(agent) {
  return new Promise((resolve) => {
    let done = false;
    const finish = (result, pid, detail) => {
      if (done) return;
      done = true;
      record(result, pid, detail);
      resolve();
    };
    const failed = (e) => {
      const s = req.socket;
      const detail = req.reusedSocket && s ? `reused-after:${s.__lastConnection || '-'}` : '';
      finish(e.code || 'EREQUEST', '-', detail);
    };
    const req = http.get(url, { agent }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => {
        if (req.socket) req.socket.__lastConnection = res.headers.connection || '-';
        const m = /pid[ =:]*(\d+)/.exec(body);
        finish(String(res.statusCode), m ? m[1] : '-');
      });
      res.on('error', failed);
    });
    req.setTimeout(20000, () => req.destroy(Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' })));
    req.on('error', failed);
  });
}

async function lane() {
  const agent = keepAlive ? new http.Agent({ keepAlive: true, maxSockets: 1 }) : new http.Agent({ keepAlive: false });
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
