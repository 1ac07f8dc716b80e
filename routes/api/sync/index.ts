import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { ErrorSchema } from '../../../schemas/error.ts'
import {
  MAX_BLOB_BYTES, SuccessSchema, SyncPayloadSchema, UserParamsSchema, VerifySchema, decodedBase64Bytes
} from '../../../schemas/sync.ts'

const errors = { 400: ErrorSchema, 503: ErrorSchema }

/** PUT / GET / POST verify / DELETE on /api/sync/:userId: the API the clients already speak. */
const sync: FastifyPluginAsyncTypebox = async function (app) {
  // Uploads are JSON only: a text/plain body is refused with 415 rather than misread.
  app.removeContentTypeParser('text/plain')

  // Ciphertext must never sit in a shared cache, errors included.
  app.addHook('onRequest', async (_request, reply) => {
    reply.header('cache-control', 'no-store')
  })

  app.put('/:userId', {
    schema: {
      summary: 'Upload (create or replace) the encrypted data of a user',
      params: UserParamsSchema,
      body: SyncPayloadSchema,
      response: { 200: SuccessSchema, ...errors, 413: ErrorSchema, 415: ErrorSchema }
    }
  }, async function (request) {
    const bytes = decodedBase64Bytes(request.body.encryptedBlob)
    if (bytes > MAX_BLOB_BYTES) {
      throw app.httpErrors.payloadTooLarge(`encryptedBlob decodes to ${bytes} bytes; the limit is ${MAX_BLOB_BYTES} bytes`)
    }
    await app.storage.store(request.params.userId, request.body)
    return { success: true } as const
  })

  app.get('/:userId', {
    schema: {
      summary: 'Download the encrypted data of a user',
      params: UserParamsSchema,
      response: { 200: SyncPayloadSchema, ...errors, 404: ErrorSchema }
    }
  }, async function (request) {
    const payload = await app.storage.get(request.params.userId)
    if (payload === null) throw app.httpErrors.notFound('User not found')
    return payload
  })

  app.post('/:userId/verify', {
    schema: {
      summary: 'Tell whether a user has data stored',
      params: UserParamsSchema,
      response: { 200: VerifySchema, ...errors }
    }
  }, async function (request) {
    return { exists: await app.storage.exists(request.params.userId) }
  })

  app.delete('/:userId', {
    schema: {
      summary: 'Delete the data of a user (succeeds when there was none)',
      params: UserParamsSchema,
      response: { 200: SuccessSchema, ...errors }
    }
  }, async function (request) {
    await app.storage.delete(request.params.userId)
    return { success: true } as const
  })
}

export default sync
