// Ignores SIGINT and the 'shutdown' message: only SIGKILL ends it.
const http = require('http');

process.on('SIGINT', () => console.log('SIGINT ignored'));
process.on('message', (m) => console.log('message ignored:', JSON.stringify(m)));
http.createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid }))).listen(8000);
