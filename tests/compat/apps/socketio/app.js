// socket.io 4 on a Node http server, as its docs show; the http server also
// answers plain requests.
const { createServer } = require('node:http');
const { Server } = require('socket.io');

const whoami = () => ({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version });

const httpServer = createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify(whoami()));
});
const io = new Server(httpServer, {});

io.on('connection', (socket) => {
  socket.on('whoami', (callback) => callback(whoami()));
});

httpServer.listen(3000);
