import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import type { FastifyReply, FastifyRequest } from 'fastify'
import { ErrorSchema } from '../../../schemas/error.ts'
import { userRateLimit } from '../../../plugins/rate-limit.ts'
import { accessControl, tokenHash } from './access-tokens.ts'
import { versionRoutes } from './versions.ts'
import { AccessDenied } from '../../../plugins/storage.ts'
import {
  ConditionalHeadersSchema, IfMatchHeadersSchema, IfNoneMatchHeadersSchema, MAX_BLOB_BYTES, StoredPayloadSchema, SuccessSchema, SyncPayloadSchema, TokenBodySchema,
  UserParamsSchema, VerifySchema, decodedBase64Bytes
} from '../../../schemas/sync.ts'

const errors = { 400: ErrorSchema, 401: ErrorSchema, 429: ErrorSchema, 503: ErrorSchema }
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

/**
 * PUT / GET / HEAD / POST verify / DELETE on /api/sync/:userId: the API the clients already
 * speak, with access tokens (access-tokens.ts); PUT /api/sync/:userId/token to replace one; and
 * the version history (versions.ts).
 */
const sync: FastifyPluginAsyncTypebox = async function (app) {
  // Ciphertext must never sit in a shared cache (errors say so themselves: see app.ts).
  app.addHook('onRequest', (_request, reply, done) => {
    reply.header('cache-control', 'no-store')
    done()
  })

  // The token is read before the per-user limit counts the request: that limit gives each
  // token its own budget, and a request refused here spends none of it.
  const { authenticate, refuse, tokenAhead } = accessControl(app)
  app.decorateRequest('accessToken', null)
  app.addHook('onRequest', authenticate)
  const perUser = userRateLimit(app, tokenAhead)
  if (perUser !== null) {
    app.addHook('onRequest', perUser.onRequest)
    // Every route of this scope counts the per-user limit (with Redis, in the per-IP round trip).
    app.addHook('onRoute', (route) => { route.config = { ...route.config, userRateLimit: true } })
  }
  /** A token that opened no record claimed with it proved nothing: see userRateLimit. */
  async function unproven (request: FastifyRequest, reply: FastifyReply, claimed: boolean | undefined, changed = false): Promise<void> {
    if (perUser !== null && request.accessToken !== null && claimed !== true) await perUser.unproven(request, reply, !changed)
  }

  /** Runs a storage operation; a record claimed by another token (AccessDenied) is a 401. */
  async function guarded<T> (request: FastifyRequest, reply: FastifyReply, operation: () => Promise<T>): Promise<T> {
    try {
      return await operation()
    } catch (err) {
      if (err instanceof AccessDenied) return await refuse(request, reply)
      throw err
    }
  }

  // The OpenAPI document: a bearer token, which AUTH_MODE=optional lets clients leave out
  // for records no device has claimed.
  const security: Array<Record<string, string[]>> = app.config.AUTH_MODE === 'required' ? [{ accessToken: [] }] : [{ accessToken: [] }, {}]

  app.put('/:userId', {
    schema: {
      tags: ['sync'],
      summary: 'Upload (create or replace) the encrypted data of a user',
      description: 'With If-Match, replaces only the version the client read; with If-None-Match: *, only creates.',
      security,
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
    const { userId } = request.params
    const token = request.accessToken
    if (ifMatch !== undefined && ifNoneMatch === '*') {
      // "Replace this version" and "only create" cannot both hold: RFC 9110 says 412, and nothing is written.
      const current = await app.storage.lookup(userId, token)
      if (current?.authorized === false) return await refuse(request, reply)
      await unproven(request, reply, current?.claimed)
      sendEtag(reply, current?.etag ?? null)
      throw app.httpErrors.preconditionFailed(PRECONDITION_FAILED)
    }
    const result = await guarded(request, reply, () => app.storage.store(userId, request.body, { ifMatch, ifNoneMatch }, token))
    if (!result.stored) {
      await unproven(request, reply, result.claimed)
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
      security,
      params: UserParamsSchema,
      headers: IfNoneMatchHeadersSchema,
      response: { 200: StoredPayloadSchema, 304: { type: 'null', description: 'Not Modified' }, ...errors, 404: ErrorSchema }
    }
  }, async function (request, reply) {
    const ifNoneMatch = parseEntityTags(request.headers['if-none-match'], true)
    const record = await guarded(request, reply,
      () => app.storage.get(request.params.userId, ifNoneMatch === '*' ? ['*'] : ifNoneMatch, request.accessToken))
    await unproven(request, reply, record?.claimed)
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
      security,
      params: UserParamsSchema,
      response: { 200: { type: 'null', description: 'The user has data; ETag names its version' }, ...errors, 404: ErrorSchema }
    }
  }, async function (request, reply) {
    const current = await app.storage.lookup(request.params.userId, request.accessToken)
    if (current?.authorized === false) return await refuse(request, reply)
    await unproven(request, reply, current?.claimed)
    if (current === null) throw app.httpErrors.notFound('User not found')
    sendEtag(reply, current.etag)
    return reply.send()
  })

  app.post('/:userId/verify', {
    schema: {
      tags: ['sync'],
      summary: 'Tell whether a user has data stored (with its ETag when it has, to a client the record is open to)',
      description: 'Answers anyone (in AUTH_MODE=optional); the ETag only goes with the access token of a claimed record.',
      security,
      params: UserParamsSchema,
      response: { 200: VerifySchema, ...errors }
    }
  }, async function (request, reply) {
    const current = await app.storage.lookup(request.params.userId, request.accessToken)
    await unproven(request, reply, current?.authorized === true && current.claimed)
    if (current?.authorized === true) sendEtag(reply, current.etag)
    return { exists: current !== null }
  })

  app.delete('/:userId', {
    schema: {
      tags: ['sync'],
      summary: 'Delete the data of a user (succeeds when there was none)',
      description: 'With If-Match, deletes only the version the client read.',
      security,
      params: UserParamsSchema,
      headers: IfMatchHeadersSchema,
      response: { 200: SuccessSchema, ...errors, 412: ErrorSchema }
    }
  }, async function (request, reply) {
    const ifMatch = parseEntityTags(request.headers['if-match'], false)
    const result = await guarded(request, reply, () => app.storage.delete(request.params.userId, { ifMatch }, request.accessToken))
    await unproven(request, reply, result.claimed, result.deleted)
    if (result.preconditionFailed) {
      sendEtag(reply, result.currentEtag)
      throw app.httpErrors.preconditionFailed(PRECONDITION_FAILED)
    }
    return { success: true } as const
  })

  app.put('/:userId/token', {
    schema: {
      tags: ['sync'],
      summary: 'Replace the access token of a user (after a lost device, with a new key)',
      description: 'The current token goes in Authorization; it fails from the moment this succeeds. ' +
        'A record no device has claimed has no token to replace (409): an upload with a token claims it.',
      security: [{ accessToken: [] }],
      params: UserParamsSchema,
      body: TokenBodySchema,
      response: { 200: SuccessSchema, ...errors, 404: ErrorSchema, 409: ErrorSchema }
    }
  }, async function (request, reply) {
    const current = request.accessToken
    if (current === null) return await refuse(request, reply, 'missing')
    const outcome = await guarded(request, reply, () => app.storage.setToken(request.params.userId, current, tokenHash(request.body.token)))
    if (outcome !== 'replaced') await unproven(request, reply, false)
    if (outcome === 'absent') throw app.httpErrors.notFound('User not found')
    if (outcome === 'unclaimed') {
      // Claiming is an upload's doing: a rotation would claim a record without proving anything.
      throw app.httpErrors.conflict('This record has no access token to replace: an upload with a token claims it')
    }
    return { success: true } as const
  })

  versionRoutes(app, { security, guarded, unproven, sendEtag, preconditionFailed: PRECONDITION_FAILED })
}

export default sync
