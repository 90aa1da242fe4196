// A release whose behaviour its configuration picks (RELEASE), so a reload
// that changes `env` switches release: "bad" answers 500 on every fifth
// request it serves (20 %), "slow" takes 300 ms on every tenth, "crash"
// exits at its first request; any other
// release answers at once. Paths for the outcome counts: /fail answers 500,
// /throw throws from a timer and /reject leaves a promise rejected (the app
// keeps running: it handles uncaughtException itself, unless NO_HANDLER).
const http = require('http');

const release = process.env.RELEASE || 'good';
let served = 0;
// NO_HANDLER: Node's own behaviour (an unhandled rejection ends the process).
if (!process.env.NO_HANDLER) process.on('uncaughtException', () => {});

http
  .createServer((req, res) => {
    served += 1;
    const answer = (status) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ release, pid: process.pid, instance: process.env.NODE_APP_INSTANCE }) + '\n');
    };
    if (req.url === '/fail') return answer(500);
    if (req.url === '/throw') {
      setImmediate(() => {
        throw new Error('thrown on purpose');
      });
      return answer(202);
    }
    if (req.url === '/reject') {
      Promise.reject(new Error('rejected on purpose'));
      return answer(202);
    }
    if (release === 'crash') process.exit(1);
    if (release === 'bad' && served % 5 === 0) return answer(500);
    if (release === 'slow' && served % 10 === 0) return setTimeout(() => answer(200), 300);
    answer(200);
  })
  .listen(8000);
