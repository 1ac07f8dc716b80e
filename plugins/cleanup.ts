import fp from 'fastify-plugin'
import type { FastifyBaseLogger } from 'fastify'
import pg, { type Pool } from 'pg'
import type { Storage } from './storage.ts'

// One number for every instance of the service (and the cleanup command): whoever holds this
// PostgreSQL advisory lock runs the cleanup; the others skip their turn.
export const CLEANUP_LOCK = 0x6c6b5f636c6e // "lk_cln"

/** What a batch of the cleanup deleted: inactive accounts, then kept versions past the history limits. */
export type CleanupPhase = 'accounts' | 'versions'

export type CleanupResult =
  | { ran: true, deleted: number, historyPruned: number, ms: number, dryRun: boolean }
  | { ran: false, reason: 'another instance is running it' }

/**
 * Deletes the accounts not accessed for more than `inactiveDays` days (GDPR retention; 0: none),
 * in batches (see storage.deleteInactive), then the kept versions past the history limits, while holding a transaction-scoped advisory lock so
 * that only one of several instances does it. With dryRun, only counts them.
 *
 * The lock lives in a transaction on a connection of its own, outside the pool: the batches
 * then run on pooled connections even with DATABASE_POOL_MAX=1, and the lock ends with that
 * transaction or connection whatever happens (nothing to unlock, nothing left on a pooled
 * connection, and a transaction-mode pooler keeps it as well). `lock: false` is for the
 * embedded database, which is one session in one process: there is nobody to exclude.
 */
export async function cleanupInactive (
  pool: Pool, storage: Storage, log: FastifyBaseLogger,
  options: { inactiveDays: number, dryRun?: boolean, batchSize?: number, lock?: boolean, onBatch?: (phase: CleanupPhase, rows: number) => void }
): Promise<CleanupResult> {
  const dryRun = options.dryRun === true
  const work = async (): Promise<CleanupResult> => {
    const started = Date.now()
    const { inactiveDays } = options
    let deleted = 0
    if (inactiveDays > 0) {
      deleted = dryRun
        ? await storage.countInactive(inactiveDays)
        : await storage.deleteInactive(inactiveDays, options.batchSize, (rows) => options.onBatch?.('accounts', rows))
    }
    // Versions past the history limits that no upload has dropped (records not written since).
    const historyPruned = dryRun ? 0 : await storage.pruneHistory(options.batchSize, (rows) => options.onBatch?.('versions', rows))
    const ms = Date.now() - started
    log.info({ inactiveDays, deleted, historyPruned, ms, dryRun },
      dryRun ? 'cleanup: dry run, nothing deleted' : 'cleanup: inactive accounts deleted')
    return { ran: true, deleted, historyPruned, ms, dryRun }
  }
  if (options.lock === false) return await work()

  const lockHolder = new pg.Client({ ...pool.options, application_name: 'logikids-sync cleanup lock' })
  const onError = (err: Error) => log.warn({ err }, 'cleanup: lock connection lost')
  lockHolder.on('error', onError)
  await lockHolder.connect()
  try {
    await lockHolder.query('BEGIN')
    const { rows: [lock] } = await lockHolder.query<{ locked: boolean }>('SELECT pg_try_advisory_xact_lock($1) AS locked', [CLEANUP_LOCK])
    if (lock?.locked !== true) {
      log.info({ inactiveDays: options.inactiveDays }, 'cleanup: skipped, another instance is running it')
      return { ran: false, reason: 'another instance is running it' }
    }
    return await work()
  } finally {
    // Ending the connection ends the transaction and its lock, even if COMMIT cannot be sent.
    await lockHolder.query('COMMIT').catch(() => {})
    await lockHolder.end().catch(() => {})
  }
}

// Node fires a timer longer than 2^31-1 ms (24.8 days) after 1 ms instead: wait in steps.
const MAX_TIMER_MS = 2 ** 31 - 1

/** Like setTimeout (unref'd), for any delay: a CLEANUP_INTERVAL of 30 days waits 30 days. */
export function setLongTimeout (fn: () => void, ms: number): { clear (): void } {
  const due = Date.now() + ms
  let timer: NodeJS.Timeout
  const arm = () => {
    const left = due - Date.now()
    if (left <= 0) {
      fn()
      return
    }
    timer = setTimeout(arm, Math.min(left, MAX_TIMER_MS))
    timer.unref()
  }
  timer = setTimeout(arm, Math.min(ms, MAX_TIMER_MS))
  timer.unref()
  return { clear: () => clearTimeout(timer) }
}

/**
 * Runs `run` after `firstDelayMs`, then `intervalMs` after each run ends (never two at once),
 * for any interval: 30 days waits 30 days. `stop()` ends it.
 */
export function scheduleEvery (run: () => Promise<unknown>, firstDelayMs: number, intervalMs: number): { stop (): void } {
  let timer: { clear (): void } | undefined
  let stopped = false
  const schedule = (delay: number) => {
    if (stopped) return
    timer = setLongTimeout(() => {
      run().catch(() => {}).finally(() => schedule(intervalMs))
    }, delay)
  }
  schedule(firstDelayMs)
  return {
    stop () {
      stopped = true
      timer?.clear()
    }
  }
}

declare module 'fastify' {
  interface FastifyInstance {
    cleanup: { run: () => Promise<CleanupResult | null> }
  }
}

/** Runs the cleanup on a schedule inside the service (CLEANUP_INTERVAL, CLEANUP_INACTIVE_DAYS). */
export default fp(async function cleanup (app) {
  const { CLEANUP_INACTIVE_DAYS: inactiveDays, CLEANUP_INTERVAL: intervalMs } = app.config
  const log = app.log.child({ component: 'cleanup' })

  async function run (): Promise<CleanupResult | null> {
    try {
      const result = await cleanupInactive(app.pg.pool, app.storage, log, { inactiveDays, lock: app.databaseKind !== 'embedded' })
      app.metrics.cleanupRuns.inc({ result: result.ran ? 'deleted' : 'skipped' })
      if (result.ran) app.metrics.cleanupDeleted.inc(result.deleted)
      // Only a run that did the work: a skip says another instance holds the lock, which a hung
      // run does too, and SyncCleanupNotRun must see that no run ends.
      if (result.ran) app.metrics.cleanupLastSuccess.setToCurrentTime()
      return result
    } catch (err) {
      app.metrics.cleanupRuns.inc({ result: 'failed' })
      app.metrics.cleanupLastFailure.setToCurrentTime()
      log.error({ err }, 'cleanup: failed; it runs again at the next interval')
      return null
    }
  }
  app.decorate('cleanup', { run })
  app.metrics.cleanupInterval.set(intervalMs / 1000)

  // It runs with CLEANUP_INACTIVE_DAYS=0 too: kept versions past the history limits are dropped by
  // the uploads, and by the cleanup for records not written since.
  if (intervalMs === 0) return
  // The first run comes a minute after start-up, not a whole interval later: a service that is
  // redeployed more often than the interval would otherwise never clean up.
  let schedule: { stop (): void } | undefined
  app.addHook('onReady', async () => { schedule = scheduleEvery(run, Math.min(60_000, intervalMs), intervalMs) })
  app.addHook('onClose', async () => { schedule?.stop() })
}, { name: 'cleanup', dependencies: ['config', 'db', 'storage', 'metrics'] })
