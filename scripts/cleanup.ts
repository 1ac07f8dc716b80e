// npm run cleanup -- --days N [--dry-run]
// Deletes (or, with --dry-run, counts) the accounts not accessed for more than N days, and drops
// the kept versions past HISTORY_VERSIONS / HISTORY_DAYS, as the service's scheduled cleanup does,
// under the same lock, and prints how many. Reads DATABASE_URL and the history settings.
// Exit status: 0 done, 1 failed, 64 bad arguments, 75 skipped (another run holds the lock), 78 bad environment.
import { parseArgs } from 'node:util'
import pg from 'pg'
import pino from 'pino'
import { loadConfig, type Config } from '../plugins/config.ts'
import { createStorage } from '../plugins/storage.ts'
import { cleanupInactive } from '../plugins/cleanup.ts'
import { preparedStatements, statementLimits, statementRunner } from '../plugins/db.ts'
import { loggerOptions } from '../logging.ts'

const usage = 'usage: npm run cleanup -- --days N [--dry-run]'
let days: number
let dryRun: boolean
try {
  const { values } = parseArgs({ options: { days: { type: 'string' }, 'dry-run': { type: 'boolean', default: false } } })
  days = Number(values.days)
  dryRun = values['dry-run'] ?? false
  if (!Number.isInteger(days) || days < 1) throw new Error('--days must be a whole number of days, at least 1')
} catch (err) {
  console.error(`cleanup: ${(err as Error).message}\n${usage}`)
  process.exit(64)
}

let config: Config
try {
  config = loadConfig()
} catch (err) {
  // EX_CONFIG: the environment is wrong, and the message says which variable and how.
  console.error(`cleanup: invalid configuration: ${(err as Error).message}`)
  process.exit(78)
}
if (config.DATABASE_URL === undefined) {
  console.error('cleanup: invalid configuration: set DATABASE_URL (the embedded development database is only open inside the running service)')
  process.exit(78)
}
const log = pino({ ...(loggerOptions({ LOG_LEVEL: config.LOG_LEVEL === 'info' ? 'warn' : config.LOG_LEVEL }) as object) })
// Bounded like the service's pool, so that a network that drops packets cannot hang the command:
// each batch is one short statement (the lock connection copies these settings).
const pool = new pg.Pool({
  connectionString: config.DATABASE_URL,
  max: 2,
  ...statementLimits(config)
})
pool.on('error', (err) => log.warn({ err }, 'database connection lost'))
try {
  const storage = createStorage(statementRunner(pool, config), log, undefined, {
    prepared: preparedStatements(config),
    history: { versions: config.HISTORY_VERSIONS, days: config.HISTORY_DAYS }
  })
  const result = await cleanupInactive(pool, storage, log, { inactiveDays: days, dryRun })
  if (!result.ran) {
    console.log(`cleanup: skipped: ${result.reason}`)
    process.exitCode = 75
  } else if (dryRun) {
    console.log(`cleanup: would delete ${result.deleted} accounts not accessed for more than ${days} days (dry run, nothing deleted)`)
  } else {
    console.log(`cleanup: deleted ${result.deleted} accounts not accessed for more than ${days} days in ${result.ms} ms` +
      ` (and ${result.historyPruned} kept versions past the history limits)`)
  }
} catch (err) {
  console.error(`cleanup: failed: ${(err as Error).message}`)
  process.exitCode = 1
} finally {
  await pool.end()
}
