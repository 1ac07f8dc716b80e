import Fastify from 'fastify'
import closeWithGrace from 'close-with-grace'
import app, { serverOptions } from './app.ts'
import { loadConfig, type Config } from './plugins/config.ts'

let config: Config
try {
  config = loadConfig()
} catch (err) {
  // The service cannot log yet: say on stderr what to fix, then stop.
  console.error(`logikids-sync: invalid configuration: ${(err as Error).message}`)
  process.exit(1)
}

const server = Fastify(serverOptions(config))

// SIGTERM/SIGINT: stop accepting, finish in-flight requests, close the pool, exit 0.
closeWithGrace({ delay: 10_000, logger: server.log }, async function ({ signal, err }) {
  if (err) server.log.error({ err }, 'closing after an unexpected error')
  else server.log.info({ signal }, 'shutting down')
  await server.close()
})

try {
  await server.register(app, { config })
  await server.listen({ port: config.PORT, host: config.HOST })
} catch (err) {
  server.log.fatal({ err }, 'could not start')
  await server.close().catch(() => {})
  process.exit(1)
}
