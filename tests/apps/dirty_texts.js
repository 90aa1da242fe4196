// Sends the manager texts with control characters: a listen error with a
// newline and a forged journal line in it, and a STATUS= with a carriage
// return and an escape sequence; then exits, so the error is logged.
// Instance 1 listens on a unix path with a newline and a forged line in it
// (in UNIX_DIR), which the manager binds and names in its journal.
const http = require('http');
const { execFileSync } = require('child_process');

const STATUS = String.raw`
import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"STATUS=dirty\x1b[2J\rFORGED-STATUS " + b"y" * 3000, os.environ["NOTIFY_SOCKET"])
`;

http
  .createServer((req, res) => res.end('ok'))
  .listen(8000, () => {
    if (process.env.NODE_APP_INSTANCE === '1' && process.env.UNIX_DIR) {
      const path = `${process.env.UNIX_DIR}/a\nnodeherd[dirty]: FORGED-BIND`;
      http.createServer((req, res) => res.end('ok')).listen(path, () => console.log('listening on the dirty path'));
    }
    if (process.env.NODE_APP_INSTANCE !== '0') return;
    execFileSync('python3', ['-c', STATUS]);
    process.send({ nodeherd: 'error', message: 'boom\nnodeherd[dirty]: FORGED-LINE worker 1 ready\u001b[2J ' + 'z'.repeat(5000) });
    setTimeout(() => process.exit(1), 500);
  });
