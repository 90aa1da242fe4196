// Sends garbage on its IPC channel and, through a child (the manager counts
// what a worker's descendants send as this worker's), on its notify socket;
// then serves. None of it may upset the manager or make the worker ready early.
const http = require('http');
const { execFileSync } = require('child_process');

process.send({ type: 'process:msg', data: 'x'.repeat(200000) });
process.send('readyy');
process.send([1, 2, 3]);
process.send({ nodeherd: 42 });
for (let i = 0; i < 1000; i++) process.send({ flood: i });

const junk = String.raw`
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for d in [b"\xff\xfe\x00garbage", b"READY=0", b"READY=yes", b"=", b"STATUS=" + b"x" * 5000, b"A" * 4000]:
    s.sendto(d, os.environ["NOTIFY_SOCKET"])
print("junk sent", flush=True)
`;
console.log(execFileSync('python3', ['-c', junk]).toString().trim());
http.createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid }))).listen(8000);
