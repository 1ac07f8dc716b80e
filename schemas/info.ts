import { Type } from '@sinclair/typebox'

const Limit = Type.Union([
  Type.Object({ max: Type.Integer(), windowSeconds: Type.Integer() }),
  Type.Null()
], { description: 'null when there is no such limit' })

/** What a client needs to know before it uploads. */
export const InfoSchema = Type.Object({
  service: Type.Literal('logikids-sync'),
  version: Type.String(),
  maxBlobBytes: Type.Integer({ description: 'largest encryptedBlob, decoded' }),
  maxBodyBytes: Type.Integer({ description: 'largest request body' }),
  retentionDays: Type.Union([Type.Integer(), Type.Null()], {
    description: 'accounts not accessed for this many days are deleted; null when they are kept'
  }),
  rateLimit: Type.Object({ perUser: Limit, perIp: Limit }),
  history: Type.Object({
    versions: Type.Integer({ description: 'previous versions kept per user (GET /api/sync/{userId}/versions); 0: none' }),
    days: Type.Union([Type.Integer(), Type.Null()], { description: 'days a previous version is kept after it was replaced; null: no age limit' })
  }),
  auth: Type.Object({
    mode: Type.Union([Type.Literal('optional'), Type.Literal('required')], {
      description: 'optional: records no device has claimed are open without an access token; required: every sync request needs one'
    })
  })
})
