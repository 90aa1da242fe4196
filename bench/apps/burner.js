// CPU-bound requests for the autoscaling benchmark: GET /burn keeps the
// event loop busy for BURN_MS (default 10 ms); any other path answers at
// once. Listens on $PORT (default 8000); under nodeherd the preload maps it
// onto the inherited socket.
const http = require('http');

const burnMs = Number(process.env.BURN_MS || 10);
function burn(ms) {
  const until = Date.now() + ms;
  let x = 0;
  while (Date.now() < until) x += Math.sqrt(x + 1);
  return x;
}
http
  .createServer((req, res) => {
    if (req.url === '/burn') burn(burnMs);
    res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE ?? null, pid: process.pid }));
  })
  .listen(Number(process.env.PORT) || 8000);
