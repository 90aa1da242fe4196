// Writes a steady flood of output while it serves: enough to fill any pipe
// or journal that stops reading.
const http = require('http');

const line = 'flood '.repeat(40);
setInterval(() => {
  for (let i = 0; i < 50; i++) console.log(line);
}, 5);
http.createServer((req, res) => res.end(JSON.stringify({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid }))).listen(8000);
