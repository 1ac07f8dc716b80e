import fp from 'fastify-plugin'
import pg from 'pg'
import { Gauge } from 'prom-client'
import { atMostEvery } from '../logging.ts'
import { sessionTimeout, statementLimits, statementRunner } from './db.ts'
import type { Queryable } from './storage.ts'

/**
 * Where reads go. Without DATABASE_READ_URL: nowhere but the primary (null). With it: the
 * replica's pool while the replica is known to hold every write the primary had acknowledged
 * REPLICA_MAX_LAG_MS ago; else null, and reads go to the primary.
 *
 * How that is known: every quarter of REPLICA_MAX_LAG_MS the primary's WAL position is sampled
 * (with the time), then the replica's replay position. Once the replica has replayed past a
 * sample, it holds every write acknowledged before that sample was taken; `caughtUpTo` is the
 * time of the newest such sample. A read may go to the replica while now - caughtUpTo is at most
 * REPLICA_MAX_LAG_MS: then no read returns a version older than one acknowledged that long ago,
 * on any instance. A replica that fails a read, or a probe, is left until a probe succeeds.
 */
export interface ReplicaReads {
  /** The replica's pool if reads may go there now, else null. */
  pool (): Queryable | null
  /** A read on the replica failed (it is down, restarting, or refused): read the primary until the next good probe. */
  failed (err: unknown): void
  counted (target: 'replica' | 'primary'): void
}

declare module 'fastify' {
  interface FastifyInstance {
    replica: ReplicaReads | null
  }
}

/** pg_lsn text (X/Y, hex) as a number of bytes. */
function lsn (text: string): bigint {
  const [high, low] = text.split('/')
  return (BigInt(`0x${high}`) << 32n) + BigInt(`0x${low}`)
}

export default fp(async function replica (app) {
  const { config } = app
  if (config.DATABASE_READ_URL === undefined) {
    app.decorate('replica', null)
    return
  }
  const maxLag = config.REPLICA_MAX_LAG_MS
  const reads = new pg.Pool({
    ...statementLimits(config, Math.min(config.DATABASE_CONNECT_TIMEOUT_MS, maxLag)),
    idleTimeoutMillis: 30_000,
    connectionString: config.DATABASE_READ_URL,
    max: config.DATABASE_POOL_MAX,
    application_name: 'logikids-sync read'
  })
  const readStatements = statementRunner(reads, config)
  // One connection each for the probes, with timeouts of the lag bound: a probe that cannot
  // answer within it has nothing useful to say.
  const probeOptions = { max: 1, idleTimeoutMillis: 60_000, connectionTimeoutMillis: maxLag, ...sessionTimeout(config, maxLag), query_timeout: maxLag }
  const primaryProbe = new pg.Pool({ ...probeOptions, connectionString: config.DATABASE_URL, application_name: 'logikids-sync replica probe' })
  const replicaProbe = new pg.Pool({ ...probeOptions, connectionString: config.DATABASE_READ_URL, application_name: 'logikids-sync replica probe' })
  for (const pool of [reads, primaryProbe, replicaProbe]) pool.on('error', () => {}) // a dead idle connection: the next probe tells

  // Times are performance.now(): a wall clock stepped back would stretch the bound.
  let samples: Array<{ at: number, position: bigint }> = []
  let caughtUpTo = -Infinity
  let healthy = false
  let warned = false

  /** Whether reads may go to the replica now; says so when that changes. */
  function usable (): boolean {
    const now = healthy && performance.now() - caughtUpTo <= maxLag
    if (now === warned) report(now)
    return now
  }
  // A replica whose lag hovers about the bound flips at every probe: a line a minute at most, each way.
  const warnGate = atMostEvery(60_000)
  const backGate = atMostEvery(60_000)
  function report (usable: boolean): void {
    if (!usable && !warned) {
      warned = true
      if (warnGate()) app.log.warn({ maxLagMs: maxLag }, 'reads: the replica (DATABASE_READ_URL) is down or too far behind; reading from the primary')
    } else if (usable && warned) {
      warned = false
      if (backGate()) app.log.info('reads: the replica has caught up; reading from it again')
    }
  }

  /** The replica is left (down, refused, or no standby of DATABASE_URL) until a probe vouches for it again. */
  function leave (): void {
    healthy = false
    caughtUpTo = -Infinity
  }

  // Which cluster a server belongs to: a standby shares its primary's system identifier.
  const SYSTEM = '(SELECT system_identifier FROM pg_control_system())::text AS system'
  let probing = false
  async function probe (): Promise<void> {
    if (probing) return
    probing = true
    try {
      const at = performance.now()
      const { rows: [primary] } = await primaryProbe.query<{ position: string, system: string }>(
        `SELECT pg_current_wal_lsn()::text AS position, ${SYSTEM}`)
      const position = lsn(primary!.position)
      // Backwards: another primary (a failover, a restore); what the old one said is void.
      if (samples.length > 0 && position < samples.at(-1)!.position) samples = []
      samples.push({ at, position })
      while (samples.length > 1 && samples[0]!.at < at - 2 * maxLag) samples.shift()
      try {
        // Only a standby of this very primary vouches for anything: a promoted or foreign server does not.
        const { rows: [standby] } = await replicaProbe.query<{ standby: boolean, position: string | null, system: string }>(
          `SELECT pg_is_in_recovery() AS standby, pg_last_wal_replay_lsn()::text AS position, ${SYSTEM}`)
        if (!standby!.standby || standby!.position === null || standby!.system !== primary!.system) throw new Error('not a standby of DATABASE_URL')
        const replayed = lsn(standby!.position)
        // From this probe alone: a standby restarted from an older point must not keep an earlier standing.
        caughtUpTo = -Infinity
        for (const sample of samples) if (sample.position <= replayed && sample.at > caughtUpTo) caughtUpTo = sample.at
        healthy = true
      } catch {
        leave()
      }
    } catch {
      // The primary does not answer: nothing new was acknowledged; the replica's standing holds.
    } finally {
      probing = false
      usable()
    }
  }

  const metrics = app.metrics
  metrics.registry.registerMetric(new Gauge({
    name: 'replica_up',
    help: '1 while the last probe found DATABASE_READ_URL a standby of DATABASE_URL (lagging or not), 0 while it is down, refused or another server',
    registers: [],
    collect () { this.set(healthy ? 1 : 0) }
  }))
  metrics.registry.registerMetric(new Gauge({
    name: 'replica_lag_seconds',
    help: 'How long ago the newest write the replica is known to hold was acknowledged (DATABASE_READ_URL); reads leave it past REPLICA_MAX_LAG_MS',
    registers: [],
    collect () { this.set(caughtUpTo === -Infinity ? Number.NaN : (performance.now() - caughtUpTo) / 1000) }
  }))
  await probe()
  const timer = setInterval(() => { probe().catch(() => {}) }, Math.max(25, Math.floor(maxLag / 4)))
  app.addHook('onClose', async () => {
    clearInterval(timer)
    await Promise.all([reads.end(), primaryProbe.end(), replicaProbe.end()])
  })

  app.decorate('replica', {
    pool: () => (usable() ? readStatements : null),
    failed () {
      leave()
      usable()
    },
    counted (target) { metrics.reads.inc({ target }) }
  } satisfies ReplicaReads)
}, { name: 'replica', dependencies: ['config', 'db', 'metrics'] })
