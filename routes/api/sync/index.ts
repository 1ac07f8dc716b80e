import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import type { FastifyReply } from 'fastify'
import { ErrorSchema } from '../../../schemas/error.ts'
import { userRateLimit } from '../../../plugins/rate-limit.ts'
import {
  ConditionalHeadersSchema, IfMatchHeadersSchema, IfNoneMatchHeadersSchema, MAX_BLOB_BYTES, SuccessSchema, SyncPayloadSchema, UserParamsSchema, VerifySchema,
  decodedBase64Bytes
} from '../../../schemas/sync.ts'

const errors = { 400: ErrorSchema, 429: ErrorSchema, 503: ErrorSchema }
const PRECONDITION_FAILED = 'Precondition failed: the data on the server is not the version this request expected'

/**
 * The entity-tag values listed in an If-Match or If-None-Match header, without quotes, or '*'.
 * Weak tags (W/"…") only count where weak comparison is allowed (If-None-Match on GET);
 * entries that are not entity tags are ignored, so they can only make a precondition fail.
 */
export function parseEntityTags (header: string | undefined, weakAllowed: boolean): string[] | '*' | undefined {
  if (header === undefined) return undefined
  if (header.trim() === '*') return '*'
  const tags: string[] = []
  for (const part of header.split(',').slice(0, 32)) {
    const match = /^\s*(W\/)?"([\x21\x23-\x7e]*)"\s*$/.exec(part)
    if (match !== null && (weakAllowed || match[1] === undefined)) tags.push(match[2]!)
  }
  return tags
}

function sendEtag (reply: FastifyReply, etag: string | null): void {
  if (etag !== null) reply.header('etag', `"${etag}"`)
}

/** PUT / GET / POST verify / DELETE on /api/sync/:userId: the API the clients already speak. */
const sync: FastifyPluginAsyncTypebox = async function (app) {
  // Ciphertext must never sit in a shared cache (errors say so themselves: see app.ts).
  app.addHook('onRequest', async (_request, reply) => {
    reply.header('cache-control', 'no-store')
  })

  const perUser = userRateLimit(app)
  if (perUser !== null) app.addHook('onRequest', perUser)

  app.put('/:userId', {
    schema: {
      tags: ['sync'],
      summary: 'Upload (create or replace) the encrypted data of a user',
      description: 'With If-Match, replaces only the version the client read; with If-None-Match: *, only creates.',
      params: UserParamsSchema,
      headers: ConditionalHeadersSchema,
      body: SyncPayloadSchema,
      response: { 200: SuccessSchema, ...errors, 412: ErrorSchema, 413: ErrorSchema, 415: ErrorSchema }
    }
  }, async function (request, reply) {
    const bytes = decodedBase64Bytes(request.body.encryptedBlob)
    if (bytes > MAX_BLOB_BYTES) {
      throw app.httpErrors.payloadTooLarge(`encryptedBlob decodes to ${bytes} bytes; the limit is ${MAX_BLOB_BYTES} bytes`)
    }
    const ifMatch = parseEntityTags(request.headers['if-match'], false)
    const ifNoneMatch = parseEntityTags(request.headers['if-none-match'], true)
    if (ifNoneMatch !== undefined && ifNoneMatch !== '*') {
      throw app.httpErrors.badRequest('If-None-Match on PUT supports only * (create only); use If-Match to replace a version')
    }
    if (ifMatch !== undefined && ifNoneMatch === '*') {
      // "Replace this version" and "only create" cannot both hold: RFC 9110 says 412, and nothing is written.
      sendEtag(reply, await app.storage.etagOf(request.params.userId))
      throw app.httpErrors.preconditionFailed(PRECONDITION_FAILED)
    }
    const result = await app.storage.store(request.params.userId, request.body, { ifMatch, ifNoneMatch })
    if (!result.stored) {
      sendEtag(reply, result.currentEtag)
      throw app.httpErrors.preconditionFailed(PRECONDITION_FAILED)
    }
    sendEtag(reply, result.etag)
    return { success: true } as const
  })

  app.get('/:userId', {
    // HEAD has a route of its own below that never reads the blob.
    exposeHeadRoute: false,
    schema: {
      tags: ['sync'],
      summary: 'Download the encrypted data of a user',
      description: 'With If-None-Match holding the current ETag, answers 304 with no body.',
      params: UserParamsSchema,
      headers: IfNoneMatchHeadersSchema,
      response: { 200: SyncPayloadSchema, 304: { type: 'null', description: 'Not Modified' }, ...errors, 404: ErrorSchema }
    }
  }, async function (request, reply) {
    const ifNoneMatch = parseEntityTags(request.headers['if-none-match'], true)
    const record = await app.storage.get(request.params.userId, ifNoneMatch === '*' ? ['*'] : ifNoneMatch)
    if (record === null) throw app.httpErrors.notFound('User not found')
    sendEtag(reply, record.etag)
    if (record.payload === null) return reply.code(304).send()
    return record.payload
  })

  app.head('/:userId', {
    // Swagger leaves HEAD routes out unless told: this one is part of the API.
    config: { swagger: { exposeHeadRoute: true } },
    schema: {
      tags: ['sync'],
      summary: 'Tell whether a user has data stored, with its ETag, without downloading it',
      params: UserParamsSchema,
      response: { 200: { type: 'null', description: 'The user has data; ETag names its version' }, ...errors, 404: ErrorSchema }
    }
  }, async function (request, reply) {
    const etag = await app.storage.etagOf(request.params.userId)
    if (etag === null) throw app.httpErrors.notFound('User not found')
    sendEtag(reply, etag)
    return reply.send()
  })

  app.post('/:userId/verify', {
    schema: {
      tags: ['sync'],
      summary: 'Tell whether a user has data stored (with its ETag when it has)',
      params: UserParamsSchema,
      response: { 200: VerifySchema, ...errors }
    }
  }, async function (request, reply) {
    const etag = await app.storage.etagOf(request.params.userId)
    sendEtag(reply, etag)
    return { exists: etag !== null }
  })

  app.delete('/:userId', {
    schema: {
      tags: ['sync'],
      summary: 'Delete the data of a user (succeeds when there was none)',
      description: 'With If-Match, deletes only the version the client read.',
      params: UserParamsSchema,
      headers: IfMatchHeadersSchema,
      response: { 200: SuccessSchema, ...errors, 412: ErrorSchema }
    }
  }, async function (request, reply) {
    const ifMatch = parseEntityTags(request.headers['if-match'], false)
    const result = await app.storage.delete(request.params.userId, { ifMatch })
    if (result.preconditionFailed) {
      sendEtag(reply, result.currentEtag)
      throw app.httpErrors.preconditionFailed(PRECONDITION_FAILED)
    }
    return { success: true } as const
  })
}

export default sync
