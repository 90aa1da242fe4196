// An ES module app ("type": "module"): Express imported with `import`, and a
// top-level await before it listens.
import express from 'express';
import { setTimeout as sleep } from 'node:timers/promises';

const app = express();
app.get('/', (req, res) => {
  res.json({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version });
});

await sleep(10); // e.g. a connection to a database
app.listen(3000, () => console.log('esm app listening on 3000'));
