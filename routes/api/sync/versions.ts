import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import { ErrorSchema } from '../../../schemas/error.ts'
import { IfMatchHeadersSchema, StoredPayloadSchema, SuccessSchema, UserParamsSchema, VersionListSchema, VersionParamsSchema } from '../../../schemas/sync.ts'
import { parseEntityTags } from './index.ts'

/** What the sync routes' scope lends the version routes, so that they answer exactly as GET and PUT do. */
export interface SyncScope {
  security: Array<Record<string, string[]>>
  /** Runs a storage operation; a record claimed by another token is a 401. */
  guarded: <T>(request: FastifyRequest, reply: FastifyReply, operation: () => Promise<T>) => Promise<T>
  /** Charges a token that proved nothing to the shared per-user budget (see index.ts). */
  unproven: (request: FastifyRequest, reply: FastifyReply, claimed: boolean | undefined, changed?: boolean) => Promise<void>
  sendEtag: (reply: FastifyReply, etag: string | null) => void
  preconditionFailed: string
}

const errors = { 400: ErrorSchema, 401: ErrorSchema, 404: ErrorSchema, 429: ErrorSchema, 503: ErrorSchema }

/** The :version of a URL as a number; past Number.MAX_SAFE_INTEGER it would not be the number sent. */
function versionOf (app: FastifyInstance, text: string): number {
  const version = Number(text)
  if (!Number.isSafeInteger(version)) throw app.httpErrors.badRequest(`version must be a whole number from 1 to ${Number.MAX_SAFE_INTEGER}`)
  return version
}

/**
 * Version history (HISTORY_VERSIONS, HISTORY_DAYS): GET /:userId/versions, GET /:userId/versions/:version
 * and POST /:userId/versions/:version/restore, in the sync routes' scope, behind the same hooks
 * (access tokens, per-user limit) as GET and PUT.
 */
export function versionRoutes (app: FastifyInstance, scope: SyncScope): void {
  const api = app.withTypeProvider<TypeBoxTypeProvider>()
  const { security, guarded, unproven, sendEtag } = scope
  const notKept = (version: number) => app.httpErrors.notFound(`Version ${version} is not kept for this user`)

  api.get('/:userId/versions', {
    schema: {
      tags: ['sync'],
      summary: 'List the versions of a user\'s data: the current one and the kept previous ones, newest first',
      description: 'Metadata only, no blobs. HISTORY_VERSIONS previous versions are kept, none longer than HISTORY_DAYS after it was replaced.',
      security,
      params: UserParamsSchema,
      response: { 200: VersionListSchema, ...errors }
    }
  }, async function (request, reply) {
    const list = await guarded(request, reply, () => app.storage.versions(request.params.userId, request.accessToken))
    await unproven(request, reply, list?.claimed)
    if (list === null) throw app.httpErrors.notFound('User not found')
    return { versions: list.versions }
  })

  api.get('/:userId/versions/:version', {
    schema: {
      tags: ['sync'],
      summary: 'Download one version of a user\'s data (the current one or a kept one)',
      description: 'The same four fields as GET /api/sync/{userId}, and the ETag that version has or had.',
      security,
      params: VersionParamsSchema,
      response: { 200: StoredPayloadSchema, ...errors }
    }
  }, async function (request, reply) {
    const { userId } = request.params
    const version = versionOf(app, request.params.version)
    const result = await guarded(request, reply, () => app.storage.version(userId, version, request.accessToken))
    await unproven(request, reply, result?.claimed)
    if (result === null) throw app.httpErrors.notFound('User not found')
    if (result.found === null) throw notKept(version)
    sendEtag(reply, result.found.etag)
    return result.found.payload
  })

  api.post('/:userId/versions/:version/restore', {
    schema: {
      tags: ['sync'],
      summary: 'Make a kept version current again, as a new version (undo an upload)',
      description: 'The version it replaces is kept like any upload\'s. The restored data keeps its blob, iv and checksum; its ' +
        'timestamp is raised to one more than the replaced version\'s when that is newer, so that clients syncing by ' +
        '"newest timestamp wins" take it. With If-Match, only if the current ETag is one of those given.',
      security,
      params: VersionParamsSchema,
      headers: IfMatchHeadersSchema,
      response: { 200: SuccessSchema, ...errors, 412: ErrorSchema }
    }
  }, async function (request, reply) {
    const { userId } = request.params
    const version = versionOf(app, request.params.version)
    const ifMatch = parseEntityTags(request.headers['if-match'], false)
    const result = await guarded(request, reply, () => app.storage.restore(userId, version, { ifMatch }, request.accessToken))
    if (result.stored) {
      sendEtag(reply, result.etag)
      return { success: true } as const
    }
    await unproven(request, reply, result.claimed)
    if ('notFound' in result) {
      throw result.notFound === 'record' ? app.httpErrors.notFound('User not found') : notKept(version)
    }
    sendEtag(reply, result.currentEtag)
    throw app.httpErrors.preconditionFailed(scope.preconditionFailed)
  })
}
