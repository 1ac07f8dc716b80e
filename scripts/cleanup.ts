// npm run cleanup -- --days N [--dry-run]
// Deletes (or, with --dry-run, counts) the accounts not accessed for more than N days, and drops
// the kept versions past HISTORY_VERSIONS / HISTORY_DAYS, as the service's scheduled cleanup does,
// under the same lock, and prints how many. Reads DATABASE_URL and the history settings.
// Exit status: 0 done, 1 failed, 64 bad arguments, 75 skipped (another run holds the lock), 78 bad environment.
import { parseArgs } from 'node:util'
import { cleanupInactive } from '../plugins/cleanup.ts'
import { startCommand } from './command.ts'
import { safeError } from '../logging.ts'
import { progress } from './progress.ts'

const usage = 'usage: npm run cleanup -- --days N [--dry-run]'
let days: number
let dryRun: boolean
try {
  const { values } = parseArgs({ options: { days: { type: 'string' }, 'dry-run': { type: 'boolean', default: false } } })
  days = /^[0-9]+$/.test(values.days ?? '') ? Number(values.days) : NaN
  dryRun = values['dry-run'] ?? false
  if (!(days >= 1)) throw new Error('--days must be a whole number of days, at least 1')
} catch (err) {
  console.error(`cleanup: ${(err as Error).message}\n${usage}`)
  process.exit(64)
}

const { log, pool, storage } = startCommand('cleanup')
let ending = () => {}
try {
  // On a terminal, how far along it is: the accounts to delete are counted first (an index scan);
  // how many kept versions are past the limits is not known until they are dropped.
  const total = dryRun || process.stderr.isTTY !== true ? null : await storage.countInactive(days)
  const shown = {
    accounts: progress('cleanup: deleting inactive accounts', 'accounts', total),
    versions: progress('cleanup: dropping versions past the history limits', 'versions', null)
  }
  let phase: keyof typeof shown = 'accounts'
  ending = () => shown[phase].end()
  const result = await cleanupInactive(pool, storage, log, {
    inactiveDays: days,
    dryRun,
    onBatch (next, rows) {
      if (next !== phase) shown[phase].end()
      phase = next
      shown[next].advance(rows)
    }
  })
  shown[phase].end()
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
  ending()
  console.error(`cleanup: failed: ${safeError(err).message}`)
  process.exitCode = 1
} finally {
  await pool.end()
}
