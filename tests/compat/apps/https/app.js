// An https server, as Node's docs show; the key and certificate paths come
// from the environment.
const https = require('node:https');
const fs = require('node:fs');

const options = {
  key: fs.readFileSync(process.env.TLS_KEY),
  cert: fs.readFileSync(process.env.TLS_CERT),
};

https.createServer(options, (req, res) => {
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version }));
}).listen(3000);
