// Answers with what a worker was given: its instance, pid, the variables
// named in `?vars=A,B`, and the credential named in `?cred=NAME` read from
// $CREDENTIALS_DIRECTORY. `/exit?code=N` exits with that code.
const http = require('http');
const fs = require('fs');
const path = require('path');

http
  .createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/exit') {
      res.end('bye\n', () => process.exit(Number(url.searchParams.get('code'))));
      return;
    }
    const vars = {};
    for (const name of (url.searchParams.get('vars') || '').split(',').filter(Boolean)) {
      vars[name] = process.env[name] ?? null;
    }
    let credential = null;
    const cred = url.searchParams.get('cred');
    if (cred && process.env.CREDENTIALS_DIRECTORY) {
      try {
        credential = fs.readFileSync(path.join(process.env.CREDENTIALS_DIRECTORY, cred), 'utf8');
      } catch (e) {
        credential = `unreadable: ${e.code}`;
      }
    }
    res.setHeader('content-type', 'application/json');
    res.end(
      JSON.stringify({
        instance: process.env.NODE_APP_INSTANCE ?? null,
        pid: process.pid,
        vars,
        credentials_directory: process.env.CREDENTIALS_DIRECTORY ?? null,
        credential,
      }) + '\n',
    );
  })
  .listen(8000);
