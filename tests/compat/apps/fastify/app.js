// Fastify 5, as its "Getting started" shows: listen({ port }) on its default
// host, localhost.
const fastify = require('fastify')({
  logger: true
})

fastify.get('/', async function handler (request, reply) {
  return { instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version }
})

const start = async () => {
  try {
    await fastify.listen({ port: 3000 })
  } catch (err) {
    fastify.log.error(err)
    process.exit(1)
  }
}
start()
