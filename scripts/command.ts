// What the commands (npm run cleanup, npm run migrate-blobs) share: the environment, checked as
// the service checks it; a logger; a small pool bounded like the service's; the storage.
import pg from 'pg'
import pino from 'pino'
import { loadConfig, type Config } from '../plugins/config.ts'
import { createStorage, type Storage } from '../plugins/storage.ts'
import { preparedStatements, statementLimits, statementRunner } from '../plugins/db.ts'
import { loggerOptions } from '../logging.ts'

export interface Command {
  config: Config
  log: pino.Logger
  pool: pg.Pool
  storage: Storage
}

/** Exits 78 (EX_CONFIG) with one line naming the setting when the environment is wrong. */
export function startCommand (name: string): Command {
  let config: Config
  try {
    config = loadConfig()
  } catch (err) {
    // EX_CONFIG: the environment is wrong, and the message says which variable and how.
    console.error(`${name}: invalid configuration: ${(err as Error).message}`)
    process.exit(78)
  }
  if (config.DATABASE_URL === undefined) {
    console.error(`${name}: invalid configuration: set DATABASE_URL (the embedded development database is only open inside the running service)`)
    process.exit(78)
  }
  // The command prints its own result: the logger says only what goes wrong.
  const log = pino({ ...(loggerOptions({ LOG_LEVEL: config.LOG_LEVEL === 'info' ? 'warn' : config.LOG_LEVEL }) as object) })
  // Bounded like the service's pool, so that a network that drops packets cannot hang the command:
  // each batch is one short statement (the cleanup's lock connection copies these settings).
  const pool = new pg.Pool({
    connectionString: config.DATABASE_URL,
    max: 2,
    ...statementLimits(config)
  })
  pool.on('error', (err) => log.warn({ err }, 'database connection lost'))
  const storage = createStorage(statementRunner(pool, config), log, undefined, {
    prepared: preparedStatements(config),
    history: { versions: config.HISTORY_VERSIONS, days: config.HISTORY_DAYS }
  })
  return { config, log, pool, storage }
}
