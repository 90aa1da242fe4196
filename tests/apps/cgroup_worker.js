// A worker for the per-worker cgroup tests: GET /burn starts a child in a
// session of its own (out of the worker's process group) that burns CPU
// and answers its pid; GET /exit ends the worker; with CG_ESCAPE set,
// instance 0 starts a helper that moves itself into that cgroup and then
// sends READY=1 on the notify socket, as if it were the worker.
const http = require('http');
const { spawn } = require('child_process');

const ESCAPE = String.raw`
import os, socket, sys
with open(sys.argv[1] + "/cgroup.procs", "w") as f:
    f.write("0")
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\nSTATUS=from outside the cgroup", os.environ["NOTIFY_SOCKET"])
print("escaped to " + sys.argv[1] + " and sent READY=1", flush=True)
`;

http
  .createServer((req, res) => {
    if (req.url === '/burn') {
      const child = spawn(process.execPath, ['-e', 'for(;;){}'], { detached: true, stdio: 'ignore' });
      child.unref();
      res.end(JSON.stringify({ child: child.pid }));
    } else if (req.url === '/exit') {
      res.end('bye');
      setTimeout(() => process.exit(3), 50);
    } else {
      res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, argv: process.execArgv }));
    }
  })
  .listen(8000, () => {
    if (process.env.CG_ESCAPE && process.env.NODE_APP_INSTANCE === '0') {
      spawn('python3', ['-c', ESCAPE, process.env.CG_ESCAPE], { stdio: 'inherit' });
    } else if (process.env.CG_ESCAPE === undefined && process.send) {
      process.send('ready');
    }
  });
