// Sends garbage on its IPC channel and notify socket, then serves.
const http = require('http');
const dgram = require('dgram');

process.send({ type: 'process:msg', data: 'x'.repeat(200000) });
process.send('readyy');
process.send([1, 2, 3]);
process.send({ nodeherd: 42 });
for (let i = 0; i < 1000; i++) process.send({ flood: i });
const notify = require('net');
http.createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid }))).listen(8000);
void dgram;
void notify;
