// A CPU-bound app for autoscaling: GET /burn keeps its event loop busy for
// BURN_MS (default 40 ms) of wall time, so under steady requests its
// event-loop utilization stays near 1 whatever else runs on the host; any
// other path answers at once. With LIE_ELU set, every worker also sends
// heartbeats of its own making claiming a fully busy loop (a compromised
// app trying to make the manager fork without bound).
const http = require('http');

const burnMs = Number(process.env.BURN_MS || 40);

function burn(ms) {
  const until = Date.now() + ms;
  let x = 0;
  while (Date.now() < until) x += Math.sqrt(x + 1);
  return x;
}

http
  .createServer((req, res) => {
    if (req.url === '/burn') burn(burnMs);
    res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid }));
  })
  .listen(8000, () => {
    if (!process.env.LIE_ELU) return;
    const lie = () => {
      process.send({ nodeherd: 'beat', delay_ms: 0, elu: 1 });
      process.send({ nodeherd: 'beat', delay_ms: 0, elu: 1e308 });
    };
    setInterval(lie, 50).unref();
  });
