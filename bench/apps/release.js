// A release whose behaviour RELEASE picks, for the canary benchmark: "bad"
// answers 500 on every fifth request it serves (20 %), "slow" takes 3 times
// as long as "good" (a 20 ms timer against none: its p99 is 3× and more),
// anything else answers at once. Every answer names its release, so the
// client knows which release served it. Listens on $PORT (default 8000);
// under nodeherd the preload maps it onto the inherited socket.
const http = require('http');

const release = process.env.RELEASE || 'good';
let served = 0;
http
  .createServer((req, res) => {
    served += 1;
    const answer = (status) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ release, pid: process.pid, instance: process.env.NODE_APP_INSTANCE ?? null }));
    };
    if (release === 'bad' && served % 5 === 0) return answer(500);
    if (release === 'slow') return setTimeout(() => answer(200), 20);
    answer(200);
  })
  .listen(Number(process.env.PORT) || 8000);
