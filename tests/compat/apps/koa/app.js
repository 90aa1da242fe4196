// Koa 3, as its README shows.
const Koa = require('koa');
const app = new Koa();

app.use(async ctx => {
  ctx.body = { instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version };
});

app.listen(3000);
