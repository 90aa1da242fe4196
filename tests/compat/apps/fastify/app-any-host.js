// Fastify 5 listening on every interface, as its docs show for containers:
// listen({ port, host: '0.0.0.0' }).
const fastify = require('fastify')({
  logger: true
})

fastify.get('/', async function handler (request, reply) {
  return { instance: process.env.NODE_APP_INSTANCE, pid: process.pid, node: process.version }
})

const start = async () => {
  try {
    await fastify.listen({ port: 3000, host: '0.0.0.0' })
  } catch (err) {
    fastify.log.error(err)
    process.exit(1)
  }
}
start()
