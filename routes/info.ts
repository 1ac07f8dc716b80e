import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { InfoSchema } from '../schemas/info.ts'
import { BODY_LIMIT, MAX_BLOB_BYTES } from '../schemas/sync.ts'
import { VERSION } from '../plugins/config.ts'

/** GET /info: the limits a client needs before uploading. */
const info: FastifyPluginAsyncTypebox = async function (app) {
  const { config } = app
  const limit = (max: number) => (max === 0 ? null : { max, windowSeconds: Math.round(config.RATE_LIMIT_WINDOW / 1000) })
  const body = {
    service: 'logikids-sync',
    version: VERSION,
    maxBlobBytes: MAX_BLOB_BYTES,
    maxBodyBytes: BODY_LIMIT,
    // Accounts are only deleted when the scheduled cleanup runs at all.
    retentionDays: config.CLEANUP_INACTIVE_DAYS === 0 || config.CLEANUP_INTERVAL === 0 ? null : config.CLEANUP_INACTIVE_DAYS,
    rateLimit: { perUser: limit(config.RATE_LIMIT_MAX), perIp: limit(config.RATE_LIMIT_IP_MAX) },
    auth: { mode: config.AUTH_MODE },
    history: { versions: config.HISTORY_VERSIONS, days: config.HISTORY_DAYS === 0 ? null : config.HISTORY_DAYS }
  } as const
  app.get('/info', { schema: { tags: ['service'], summary: 'Limits and version, for clients', response: { 200: InfoSchema } } }, async () => body)
}

export default info
