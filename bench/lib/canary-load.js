// The canary benchmark's client: GET / on a fresh connection RATE times a
// second (at most 64 in flight) until SIGTERM, then writes to OUT, as JSON,
// when it started (`t0`, ms since the epoch) and every answer (`seen`):
// [ms since t0 when asked, status or 0 for a failure, the release that
// answered, ms it took]. Usage: node canary-load.js PORT RATE OUT
'use strict';
const http = require('http');
const fs = require('fs');

const [port, rate, out] = [Number(process.argv[2]), Number(process.argv[3]), process.argv[4]];
const t0 = Number(process.hrtime.bigint()) / 1e6;
const epoch = Date.now();
const now = () => Number(process.hrtime.bigint()) / 1e6 - t0;
const seen = [];
let inFlight = 0;

function one() {
  if (inFlight >= 64) return;
  inFlight += 1;
  const at = now();
  const done = (status, release) => {
    inFlight -= 1;
    seen.push([Math.round(at), status, release, Math.round((now() - at) * 10) / 10]);
  };
  const req = http.get({ host: '127.0.0.1', port, path: '/', agent: false, timeout: 4000 }, (res) => {
    let body = '';
    res.setEncoding('utf8');
    res.on('data', (d) => (body += d));
    res.on('end', () => {
      let release = '?';
      try {
        release = JSON.parse(body).release || '?';
      } catch (_) {}
      done(res.statusCode, release);
    });
    res.on('error', () => done(0, ''));
  });
  req.on('timeout', () => req.destroy());
  req.on('error', () => done(0, ''));
}

const every = 1000 / rate;
let next = now();
(function tick() {
  while (now() >= next) {
    one();
    next += every;
  }
  setTimeout(tick, Math.max(0, next - now()));
})();

process.on('SIGTERM', () => {
  fs.writeFileSync(out, JSON.stringify({ t0: epoch, seen }));
  process.exit(0);
});
