// Instance 0 says 'ready', then starts a helper that joins its sibling's
// process group (instance 1, which never says it is ready) and sends
// READY=1 and a STATUS= on the notify socket, as if it were the sibling.
const http = require('http');
const { spawn } = require('child_process');

const FORGE = String.raw`
import os, socket, sys, time
me, manager = int(sys.argv[1]), int(sys.argv[2])
def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out.append(int(d))
    return out
sibling = None
for _ in range(500):
    others = [p for p in children(manager) if p != me]
    if others:
        sibling = others[0]
        break
    time.sleep(0.02)
os.setpgid(0, sibling)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\nSTATUS=forged by a sibling", os.environ["NOTIFY_SOCKET"])
print("forged for %d from group %d" % (sibling, os.getpgid(0)), flush=True)
# Stay until the worker that started it is gone: the manager reads who sent
# a notification from /proc, and one that already exited is nobody's.
parent = os.getppid()
for _ in range(600):
    if os.getppid() != parent:
        break
    time.sleep(0.1)
`;

http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid })))
  .listen(8000, () => {
    if (process.env.NODE_APP_INSTANCE !== '0') return;
    process.send('ready');
    // Give the sibling a moment to be forked.
    setTimeout(() => spawn('python3', ['-c', FORGE, String(process.pid), String(process.ppid)], { stdio: 'inherit' }), 300);
  });
