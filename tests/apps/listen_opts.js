// listen({port, host}): the options form.
const http = require('http');

const server = http.createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, via: 'options' })));
server.listen({ port: 8123, host: '0.0.0.0' });
