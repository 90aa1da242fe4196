// Serves normally; GET /spin sends its event loop into an endless loop in a
// named function (the hang autopsy must name it and this file's line), and
// GET /sleep blocks it in native code (a synchronous child process), where
// no inspector message is ever handled.
const http = require('http');
const { execFileSync } = require('child_process');

function spinForever() {
  let n = 0;
  for (;;) { // line 10: where the autopsy finds it
    n = (n + 1) % 1000;
  }
}

function sleepInNativeCode() {
  execFileSync('sleep', ['60']);
}

http
  .createServer((req, res) => {
    if (req.url === '/spin') spinForever();
    if (req.url === '/sleep') sleepInNativeCode();
    res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid }));
  })
  .listen(8000);
