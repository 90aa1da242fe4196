// An app with its own Prometheus metrics, as prom-client's README shows:
// the default metrics and a counter of its requests.
const http = require('http');
const client = require('prom-client');

client.collectDefaultMetrics();
const requests = new client.Counter({ name: 'app_requests_total', help: 'Requests served.', labelNames: ['route'] });
http
  .createServer((req, res) => {
    requests.inc({ route: req.url });
    res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid }));
  })
  .listen(8000);
