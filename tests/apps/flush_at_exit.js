// A worker that holds a backlog of log lines and flushes it at exit the way
// pino's sonic-boom does: synchronous writes to stdout, sleeping 100 ms
// whenever the pipe is full (EAGAIN), until all of it is out.
const http = require('http');
const fs = require('fs');

const fd = process.stdout.fd; // Node makes the stdout pipe non-blocking, as for pino
const line = `${'x'.repeat(199)}\n`;
const backlog = Buffer.from(line.repeat(Number(process.env.FLUSH_BYTES || 3 << 20) / line.length));

const server = http.createServer((req, res) => res.end('ok\n'));
server.listen(8000);

process.on('SIGINT', () => {
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  let off = 0;
  while (off < backlog.length) {
    try {
      off += fs.writeSync(fd, backlog, off, backlog.length - off);
    } catch (e) {
      if (e.code !== 'EAGAIN') throw e;
      Atomics.wait(sleeper, 0, 0, 100);
    }
  }
  fs.writeSync(2, `flushed ${backlog.length} bytes\n`);
  process.exit(0);
});
