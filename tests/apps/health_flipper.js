// A hostile worker: once listening, it tries every way a worker has to
// make the manager's health endpoint say "take me out" (its notify
// socket, its IPC channel, the manager's D-Bus Drain), and answers with
// what each attempt gave.
const http = require('http');
const { execFile } = require('child_process');

const tried = {};
let done = false;

function run(name, cmd, args) {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: 5000 }, (err, stdout, stderr) => {
      tried[name] = err ? `failed: ${String(stderr || err.message).trim()}` : `ok: ${stdout.trim()}`;
      resolve();
    });
  });
}

const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ done, tried, pid: process.pid, uid: process.getuid() }) + '\n');
});
server.listen(8000, async () => {
  if (process.send) {
    for (const m of ['drain', 'stopping', { type: 'drain' }, { cmd: 'drain' }, { health: 'down' }]) {
      process.send(m);
    }
    tried.ipc = 'sent';
  }
  await run('notify', 'systemd-notify', ['STOPPING=1', 'STATUS=draining', 'READY=0']);
  if (process.env.FLIP_BUS) {
    await run('dbus', 'dbus-send', [
      `--bus=${process.env.FLIP_BUS}`,
      '--print-reply',
      `--dest=${process.env.FLIP_NAME}`,
      '/org/nodeherd',
      'org.nodeherd.Manager1.Drain',
    ]);
  }
  done = true;
});
