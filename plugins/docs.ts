import fp from 'fastify-plugin'
import swagger from '@fastify/swagger'
import swaggerUi from '@fastify/swagger-ui'
import { VERSION } from './config.ts'

/**
 * The OpenAPI 3 description, generated from the routes' TypeBox schemas, at /docs/json, and
 * Swagger UI at /docs. Registered before the routes so that it sees every one of them.
 */
export default fp(async function docs (app) {
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: {
        title: 'logikids-sync',
        version: VERSION,
        description: 'Zero-knowledge sync store: keeps client-side-encrypted blobs keyed by user id. ' +
          'Errors are JSON {"error": string, "statusCode": number}. See docs/sync-protocol.md for ETag and If-Match.'
      },
      components: {
        securitySchemes: {
          accessToken: {
            type: 'http',
            scheme: 'bearer',
            description: 'The access token a device derives from the user\'s key (docs/sync-protocol.md); ' +
              'optional for records no device has claimed, unless AUTH_MODE=required'
          }
        }
      },
      tags: [
        { name: 'sync', description: 'The encrypted data of one user' },
        { name: 'service', description: 'Health, limits and metrics' }
      ]
    },
    // `unsafe` is a serializer's instruction (schemas/sync.ts StoredPayloadSchema), not a format a
    // client knows: the document names the blob's format as the upload's schema does.
    transformObject: (document) => JSON.parse(JSON.stringify('openapiObject' in document ? document.openapiObject : document.swaggerObject)
      .replaceAll('"format":"unsafe"', '"format":"base64"'))
  })
  await app.register(swaggerUi, {
    routePrefix: '/docs',
    // Swagger UI brings its own Content-Security-Policy for its pages.
    staticCSP: true
  })
}, { name: 'docs' })
