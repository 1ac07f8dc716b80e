import Fastify from 'fastify'
import closeWithGrace from 'close-with-grace'
import pino from 'pino'
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

const options = serverOptions(config)
// Log lines are written to stdout asynchronously, 16 kB at a time (SonicBoom's writes are at most
// 16 KiB) and at least once a second, instead of one blocking write per line on the event loop:
// system calls are dear on these machines, and that write was about a tenth of the CPU of a 1 KiB
// request under load in the bench. A line reaches the log within a second. pino writes what is
// left synchronously when the process exits, a crash that close-with-grace handles included; a
// process killed outright (SIGKILL, out of memory) loses up to a second of lines. Should stdout
// stop taking lines, at most 16 MiB wait; later ones are dropped rather than fill the memory.
options.logger = {
  ...(options.logger as object),
  stream: pino.destination({ dest: 1, sync: false, minLength: 16_000, periodicFlush: 1000, maxLength: 16 * 1024 * 1024 })
}
const server = Fastify(options)

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
