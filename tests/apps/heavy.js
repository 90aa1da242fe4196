// Holds a large heap (HEAVY_MIB, default 200 MiB: one array of doubles and
// many small objects) and serves small JSON answers, so that a heap
// snapshot of it takes seconds; GET /spin burns CPU in a named function for
// a CPU profile to find.
const http = require('http');

const mib = Number(process.env.HEAVY_MIB || 200);
const doubles = new Array(Math.floor((mib * 0.75 * 1024 * 1024) / 8)).fill(1.5);
const objects = [];
for (let i = 0; i < Math.floor((mib * 0.25 * 1024 * 1024) / 64); i++) objects.push({ i, name: `o${i}` });

function burnCpuForProfile(ms) {
  const until = Date.now() + ms;
  let x = 0;
  while (Date.now() < until) x += Math.sqrt(x + 1);
  return x;
}

http
  .createServer((req, res) => {
    if (req.url === '/spin') burnCpuForProfile(20);
    res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, held: doubles.length + objects.length }));
  })
  .listen(8000);
