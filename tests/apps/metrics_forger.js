// A compromised worker against the metrics endpoint (issue 23). Every
// worker counts one app figure, `app_hits_total`, worth its instance + 1.
// Worker 0 also forges, as FORGE says:
// - `names`: families the manager owns (`nodeherd_workers 99`) and samples
//   carrying a `worker` label of a sibling's;
// - `siblings`: answers the metrics requests sent to its siblings (request
//   ids are sequential: its own, give or take a few);
// - `last-words`: sends the counters of a worker that leaves while serving.
const http = require('http');
const client = require('prom-client');

const me = process.env.NODE_APP_INSTANCE;
new client.Counter({ name: 'app_hits_total', help: 'Hits.', labelNames: ['route'] }).inc({ route: '/' }, Number(me) + 1);
if (me === '0' && process.env.FORGE === 'names') {
  new client.Gauge({ name: 'nodeherd_workers', help: 'Forged.', labelNames: ['app'] }).set({ app: 'metrics_forger' }, 99);
  new client.Counter({ name: 'app_forged_total', help: 'Forged.', labelNames: ['worker'] }).inc({ worker: '1' }, 1000);
}
if (me === '0' && process.env.FORGE === 'siblings') {
  process.on('internalMessage', (msg) => {
    if (!msg || msg.cmd !== 'NODE_NODEHERD_METRICS') return;
    for (let d = -3; d <= 3; d++) {
      if (d !== 0) process.send({ nodeherd: 'metrics', id: msg.id + d, text: 'app_hits_total{route="/"} 1000000\n' });
    }
  });
}
if (me === '0' && process.env.FORGE === 'last-words') {
  // The counters a leaving worker sends as its drain ends (id 0), sent
  // while it serves, over and over.
  const forged = '# TYPE app_hits_total counter\napp_hits_total{route="/"} 1000000\n';
  setInterval(() => process.send({ nodeherd: 'metrics', id: 0, text: forged }), 20).unref();
}
http.createServer((req, res) => res.end(me)).listen(8000);
