// Answers with what a worker sees: its index, pid and the socket variables.
const http = require('http');
const fs = require('fs');

const server = http.createServer((req, res) => {
  const fds = fs.readdirSync('/proc/self/fd').map((fd) => {
    try {
      return `${fd}:${fs.readlinkSync(`/proc/self/fd/${fd}`)}`;
    } catch (_) {
      return `${fd}:?`;
    }
  });
  res.setHeader('content-type', 'application/json');
  res.end(
    JSON.stringify({
      instance: process.env[process.env.EXPECT_INSTANCE_VAR || 'NODE_APP_INSTANCE'] ?? null,
      node_app_instance: process.env.NODE_APP_INSTANCE ?? null,
      pid: process.pid,
      uid: process.getuid(),
      gid: process.getgid(),
      listen_pid: process.env.LISTEN_PID ?? null,
      listen_fds: process.env.LISTEN_FDS ?? null,
      listen_fdnames: process.env.LISTEN_FDNAMES ?? null,
      marker: process.env.MARKER ?? null,
      node_options: process.env.NODE_OPTIONS ?? null,
      path: req.url,
      fds,
    }) + '\n',
  );
});
server.listen(8000);
// LINGER_MS: on SIGINT, stop accepting and exit only that long after, as an
// app that finishes slow work before it leaves.
if (process.env.LINGER_MS) {
  process.on('SIGINT', () => {
    server.close();
    setTimeout(() => process.exit(0), Number(process.env.LINGER_MS));
  });
}
