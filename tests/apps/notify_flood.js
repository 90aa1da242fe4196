// Every worker says READY=1 on its notify socket (with wait_ready), through
// a helper as a non-Node worker would; instance 0 then floods the notify
// socket with STATUS= datagrams (control characters in them) and junk.
const http = require('http');
const { execFileSync, spawn } = require('child_process');

const READY = String.raw`
import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
`;
const FLOOD = String.raw`
import os, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
addr = os.environ["NOTIFY_SOCKET"]
end = time.time() + float(os.environ.get("FLOOD_SECONDS", "12"))
i = 0
while time.time() < end:
    i += 1
    msg = b"STATUS=flood %d \x1b[2J\rFAKE" % i if i % 2 else b"junk %d" % i + b"A" * 2000
    try:
        s.sendto(msg, addr)
    except OSError:
        time.sleep(0.001)
`;

http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid })))
  .listen(8000, () => {
    execFileSync('python3', ['-c', READY]);
    if (process.env.NODE_APP_INSTANCE === '0' && !process.env.NO_FLOOD) {
      spawn('python3', ['-c', FLOOD], { stdio: 'inherit' });
    }
  });
