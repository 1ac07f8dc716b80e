import fp from 'fastify-plugin'

/**
 * Requests that share a connection run one after the other. Node parses pipelined requests as
 * they arrive and only sends the answers in order, so a PUT and a DELETE written back to back
 * on one connection could run in either order: the DELETE answered 200 and the data stayed.
 * RFC 9112 section 9.3.2 allows parallel handling for safe methods only; here every request
 * waits for the one before it on its connection (which costs nothing without pipelining).
 */
export default fp(async function pipelining (app) {
  const previous = new WeakMap<object, Promise<void>>()
  app.addHook('onRequest', async (request, reply) => {
    const connection = request.raw.socket
    const before = previous.get(connection)
    const done = new Promise<void>((resolve) => {
      // 'close' follows the last byte of the answer, or the end of an aborted one.
      reply.raw.once('close', resolve)
    })
    previous.set(connection, done)
    if (before !== undefined) await before
  })
}, { name: 'pipelining' })
