// A compromised worker: slot 0 sends heartbeats of its own making with
// request counts (a real one, then lower ones, then absurd and inconsistent
// ones) to see what the manager believes. Slot 1 is honest.
const http = require('http');

http.createServer((req, res) => res.end('ok\n')).listen(8000, () => {
  if (process.env.NODE_APP_INSTANCE !== '0') return;
  const b = (n) => [n, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
  const beat = (out) => process.send({ nodeherd: 'beat', delay_ms: 0, out });
  beat({ c: [0, 0, 0, 0, 1000], b: b(1000), s: 0, x: 0, r: 0 });
  beat({ c: [0, 0, 0, 0, 10], b: b(10), s: 0, x: 0, r: 0 });
  beat({ c: [0, 0, 0, 0, 2 ** 60], b: b(2 ** 60), s: 0, x: 0, r: 0 });
  beat({ c: [0, 0, 0, 0, 5000], b: b(2000), s: 0, x: 0, r: 0 });
  beat({ c: [0, 0, 0, 0, -1], b: b(-1), s: 0, x: 0, r: 0 });
  beat({ c: [0, 0, 0, 0, 1001.5], b: b(1001.5), s: 0, x: 0, r: 0 });
  process.send('forged');
});
