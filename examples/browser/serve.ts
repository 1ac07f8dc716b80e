import { createReadStream } from 'node:fs'
import { stat } from 'node:fs/promises'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { extname, join, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

// Serves the example page and the built client, and nothing else of the repository, so that
// the page runs from an origin of its own (CORS_ORIGINS on the service must name it), and
// config.json, which tells the page the service's address: not a URL parameter, so that a
// link cannot point the page (and the token it sends) at another service.
// `npm run example` starts it; the browser tests start it on a spare port.

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const SERVED = ['examples/browser/', 'client/dist/']
const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.map': 'application/json'
}

export interface ExampleServer {
  origin: string
  /** The page's address. */
  page: string
  /** The service the page talks to (config.json), e.g. after the service started on a spare port. */
  setApi: (api: string) => void
  close: () => Promise<void>
}

export async function serveExample (api = 'http://localhost:3000', port = 0, host = '127.0.0.1'): Promise<ExampleServer> {
  let config = JSON.stringify({ api })
  const server = createServer(async (request, response) => {
    const path = decodeURIComponent(new URL(request.url ?? '/', 'http://example').pathname).replace(/^\/+/, '')
    if (request.method === 'GET' && path === 'examples/browser/config.json') {
      response.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' }).end(config)
      return
    }
    const file = resolve(ROOT, path.endsWith('/') ? join(path, 'index.html') : path)
    const allowed = SERVED.some((folder) => file.startsWith(resolve(ROOT, folder) + sep))
    const type = TYPES[extname(file)]
    if (request.method !== 'GET' || !allowed || type === undefined || !(await stat(file).then((s) => s.isFile(), () => false))) {
      response.writeHead(404, { 'content-type': 'text/plain' }).end('not found')
      return
    }
    response.writeHead(200, { 'content-type': type, 'cache-control': 'no-store' })
    createReadStream(file).pipe(response)
  })
  await new Promise<void>((resolve) => server.listen(port, host, resolve))
  const origin = `http://${host}:${(server.address() as AddressInfo).port}`
  return {
    origin,
    page: `${origin}/examples/browser/`,
    setApi: (next) => { config = JSON.stringify({ api: next }) },
    close: () => new Promise((resolve) => { server.closeAllConnections(); server.close(() => resolve()) })
  }
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const port = Number(process.env.EXAMPLE_PORT ?? 8080)
  const api = process.env.API_URL ?? 'http://localhost:3000'
  const example = await serveExample(api, port, process.env.EXAMPLE_HOST ?? 'localhost')
  console.log(`The example page: ${example.page} (talking to ${api}; API_URL changes it)`)
  console.log(`Start the service with CORS_ORIGINS=${example.origin} (and DATABASE_URL, or none for the embedded database).`)
}
