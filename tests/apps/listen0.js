// listen(0) asks for any free port; under nodeherd it gets the inherited socket.
const http = require('http');

const server = http.createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, via: 'listen0' })));
server.listen(0, () => console.log('listening on', server.address()));
