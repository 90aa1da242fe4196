// Asks PORT over HTTP/2 (cleartext): OK requests to /, FAIL to /fail, then
// prints how many answers came back by status.
const http2 = require('http2');

const [port, ok, fail] = process.argv.slice(2).map(Number);
const seen = {};
let left = ok + fail;
const session = http2.connect(`http://127.0.0.1:${port}`);
session.on('error', (e) => {
  console.error(e.message);
  process.exit(1);
});
const ask = (path) => {
  const req = session.request({ ':path': path });
  req.on('response', (h) => {
    seen[h[':status']] = (seen[h[':status']] || 0) + 1;
  });
  req.resume();
  req.on('end', () => {
    left -= 1;
    if (left === 0) {
      console.log(JSON.stringify(seen));
      session.close();
    }
  });
  req.end();
};
for (let i = 0; i < ok; i += 1) ask('/');
for (let i = 0; i < fail; i += 1) ask('/fail');
