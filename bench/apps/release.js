// A release whose behaviour RELEASE picks, for the canary benchmark: "bad"
// answers 500 on every fifth request it serves (20 %); "slow" answers
// after 3 × BASE_MS (default 20 ms when BASE_MS is 0); any other answers
// after BASE_MS (default 0: at once). Every answer names its release, so
// the client knows which release served it. Listens on $PORT (default
// 8000); under nodeherd the preload maps it onto the inherited socket.
const http = require('http');

const release = process.env.RELEASE || 'good';
const base = Number(process.env.BASE_MS || 0);
let served = 0;
http
  .createServer((req, res) => {
    served += 1;
    const answer = (status) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ release, pid: process.pid, instance: process.env.NODE_APP_INSTANCE ?? null }));
    };
    if (release === 'bad' && served % 5 === 0) return answer(500);
    if (release === 'slow') return setTimeout(() => answer(200), 3 * base || 20);
    if (base > 0) return setTimeout(() => answer(200), base);
    answer(200);
  })
  .listen(Number(process.env.PORT) || 8000);
