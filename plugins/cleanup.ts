import fp from 'fastify-plugin'
import type { FastifyBaseLogger } from 'fastify'
import type { Pool } from 'pg'
import type { Storage } from './storage.ts'

// One number for every instance of the service (and the cleanup command): whoever holds this
// PostgreSQL advisory lock runs the cleanup; the others skip their turn.
export const CLEANUP_LOCK = 0x6c6b5f636c6e // "lk_cln"

export type CleanupResult =
  | { ran: true, deleted: number, ms: number, dryRun: boolean }
  | { ran: false, reason: 'another instance is running it' }

/**
 * Deletes the accounts not accessed for more than `inactiveDays` days (GDPR retention), under
 * an advisory lock so that only one of several instances does it, in batches (see
 * storage.deleteInactive). With dryRun, only counts them.
 */
export async function cleanupInactive (
  pool: Pool, storage: Storage, log: FastifyBaseLogger, options: { inactiveDays: number, dryRun?: boolean, batchSize?: number }
): Promise<CleanupResult> {
  const lockHolder = await pool.connect()
  const onError = (err: Error) => log.warn({ err }, 'cleanup: lock connection lost')
  lockHolder.on('error', onError)
  try {
    const { rows: [lock] } = await lockHolder.query<{ locked: boolean }>('SELECT pg_try_advisory_lock($1) AS locked', [CLEANUP_LOCK])
    if (lock?.locked !== true) {
      log.info({ inactiveDays: options.inactiveDays }, 'cleanup: skipped, another instance is running it')
      return { ran: false, reason: 'another instance is running it' }
    }
    try {
      const started = Date.now()
      const deleted = options.dryRun === true
        ? await storage.countInactive(options.inactiveDays)
        : await storage.deleteInactive(options.inactiveDays, options.batchSize)
      const ms = Date.now() - started
      log.info({ inactiveDays: options.inactiveDays, deleted, ms, dryRun: options.dryRun === true },
        options.dryRun === true ? 'cleanup: dry run, nothing deleted' : 'cleanup: inactive accounts deleted')
      return { ran: true, deleted, ms, dryRun: options.dryRun === true }
    } finally {
      await lockHolder.query('SELECT pg_advisory_unlock($1)', [CLEANUP_LOCK])
    }
  } finally {
    lockHolder.removeListener('error', onError)
    lockHolder.release()
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
    if (inactiveDays === 0) return null
    try {
      const result = await cleanupInactive(app.pg.pool, app.storage, log, { inactiveDays })
      app.metrics.cleanupRuns.inc({ result: result.ran ? 'deleted' : 'skipped' })
      if (result.ran) app.metrics.cleanupDeleted.inc(result.deleted)
      return result
    } catch (err) {
      app.metrics.cleanupRuns.inc({ result: 'failed' })
      log.error({ err }, 'cleanup: failed; it runs again at the next interval')
      return null
    }
  }
  app.decorate('cleanup', { run })

  if (inactiveDays === 0 || intervalMs === 0) return
  // The first run comes a minute after start-up, not a whole interval later: a service that is
  // redeployed more often than the interval would otherwise never clean up.
  let timer: NodeJS.Timeout | undefined
  let closed = false
  const schedule = (delay: number) => {
    if (closed) return
    timer = setTimeout(() => { void run().finally(() => schedule(intervalMs)) }, delay)
    timer.unref()
  }
  app.addHook('onReady', async () => schedule(Math.min(60_000, intervalMs)))
  app.addHook('onClose', async () => {
    closed = true
    clearTimeout(timer)
  })
}, { name: 'cleanup', dependencies: ['config', 'db', 'storage', 'metrics'] })
