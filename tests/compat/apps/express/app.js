// Express 5, as its "Hello world" example shows.
const express = require('express')
const app = express()
const port = 3000

app.get('/', (req, res) => {
  res.json({ instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version })
})

app.listen(port, () => {
  console.log(`Example app listening on port ${port}`)
})
