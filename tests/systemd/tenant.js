// A hostile tenant for tests/systemd/e2e.sh: an ordinary nodeherd app whose
// code, on GET /attack?victim=APP&pids=P1,P2, tries from inside its own unit
// (its own user, its sandbox) what one app must not be able to do to
// another, and answers with what each attempt got:
//   own      RequestName org.nodeherd.APP on the system bus
//   scale    Manager1.Scale(1) on the victim's manager
//   restart  Manager1.Restart() on the victim's manager
//   kill     SIGKILL to each of the victim's pids
//   read     the victim's data file /srv/APP-data/secret
//   runtime  a listing of the victim's runtime directory (its control socket)
// Every other request answers "tenant <pid>".
const http = require('http');
const fs = require('fs');
const { execFileSync } = require('child_process');

// "OK <reply>" or "ERR <error name>[: <message>]" of one dbus-send call.
function bus(withMessage, args) {
  try {
    const out = execFileSync('dbus-send', ['--system', '--print-reply', '--reply-timeout=20000', ...args], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    return ('OK ' + out.split('\n').slice(1).join(' ').replace(/\s+/g, ' ')).trim();
  } catch (e) {
    const text = `${e.stdout || ''}${e.stderr || ''}`;
    const m = /^Error ([^:\s]+): (.*)$/m.exec(text);
    if (!m) return `FAILED ${e.message} ${text}`.trim();
    return withMessage ? `ERR ${m[1]}: ${m[2]}` : `ERR ${m[1]}`;
  }
}

function errno(f) {
  try {
    f();
    return 'OK';
  } catch (e) {
    return e.code || String(e);
  }
}

function attack(victim, pids) {
  const name = `org.nodeherd.${victim}`;
  return {
    uid: process.getuid(),
    own: bus(false, ['--dest=org.freedesktop.DBus', '/org/freedesktop/DBus',
      'org.freedesktop.DBus.RequestName', `string:${name}`, 'uint32:4']),
    scale: bus(true, [`--dest=${name}`, '/org/nodeherd', 'org.nodeherd.Manager1.Scale', 'int32:1']),
    restart: bus(true, [`--dest=${name}`, '/org/nodeherd', 'org.nodeherd.Manager1.Restart']),
    kill: pids.map((p) => errno(() => process.kill(p, 'SIGKILL'))),
    read: errno(() => fs.readFileSync(`/srv/${victim}-data/secret`)),
    runtime: errno(() => fs.readdirSync(`/run/nodeherd/${victim}`)),
  };
}

http
  .createServer((req, res) => {
    const url = new URL(req.url, 'http://localhost');
    if (url.pathname === '/attack') {
      const pids = (url.searchParams.get('pids') || '').split(',').filter(Boolean).map(Number);
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(attack(url.searchParams.get('victim'), pids)) + '\n');
      return;
    }
    res.end(`tenant ${process.pid}\n`);
  })
  .listen(8000, () => console.log(`tenant ${process.env.NODE_APP_INSTANCE} listening`));
