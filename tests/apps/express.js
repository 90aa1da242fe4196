// An Express 4 app, unmodified: app.listen(port).
const express = require('express');

const app = express();
app.get('/', (req, res) => res.json({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, via: 'express' }));
app.listen(3000, () => console.log('express listening'));
