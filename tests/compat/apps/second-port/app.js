// Express on the main port, plus a metrics endpoint of its own on a second
// port per worker: 9100 + NODE_APP_INSTANCE.
const express = require('express');
const http = require('node:http');

const instance = Number(process.env.NODE_APP_INSTANCE);

const app = express();
app.get('/', (req, res) => {
  res.json({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version });
});
app.listen(3000);

const metrics = http.createServer((req, res) => {
  res.setHeader('content-type', 'text/plain; version=0.0.4');
  res.end(`# TYPE app_instance gauge\napp_instance ${instance}\n# TYPE process_pid gauge\nprocess_pid ${process.pid}\n`);
});
metrics.listen(9100 + instance);
