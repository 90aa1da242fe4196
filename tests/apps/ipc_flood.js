// Instance 0 floods its IPC channel with valid messages (heartbeats,
// connection counts, stray metrics answers, listen errors) for as long as
// it lives, keeping the channel full; the other instances just serve.
const http = require('http');

http
  .createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid })))
  .listen(8000, () => {
    if (process.env.NODE_APP_INSTANCE !== '0') return;
    // Mostly connection counts, each different: the costliest for the
    // manager (every one is a new fair share to work out and send).
    const kinds = [
      () => ({ nodeherd: 'beat', delay_ms: 0 }),
      (i) => ({ nodeherd: 'conns', open: i % 5000 }),
      (i) => ({ nodeherd: 'conns', open: (i * 7) % 5000 }),
      (i) => ({ nodeherd: 'conns', open: (i * 13) % 5000 }),
      (i) => ({ nodeherd: 'metrics', id: i, text: 'x'.repeat(2000) }),
      (i) => ({ nodeherd: 'error', message: `flood ${i}` }),
      () => ({ nodeherd: 'listening', fd: 3 }),
    ];
    let i = 0;
    let inflight = 0;
    const burst = () => {
      // Enough in flight to keep the channel full, not so much that this
      // worker's own memory runs away.
      while (inflight < 20000) {
        inflight += 1;
        i += 1;
        process.send(kinds[i % kinds.length](i), () => {
          inflight -= 1;
        });
      }
      setImmediate(burst);
    };
    burst();
  });
