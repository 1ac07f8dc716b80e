import t from 'tap'
import { randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { loadConfig } from '../../plugins/config.ts'
import type { TestContext } from '../helper.ts'
import { runServerToExit, startServer } from '../server-process.ts'

// `npm start` with no DATABASE_URL: the embedded database, as a newcomer meets it.
const dataDir = mkdtempSync(join(tmpdir(), 'lk-embedded-'))
t.teardown(() => rmSync(dataDir, { recursive: true, force: true }))

const start = (t: TestContext) => startServer(t, { env: { EMBEDDED_DATA_DIR: dataDir, CLEANUP_INTERVAL: '0' } })

const payload = (n: number) => ({
  encryptedBlob: Buffer.from(`ciphertext ${n}`).toString('base64'), iv: 'AAAAAAAAAAAAAAAA', timestamp: n + 1, checksum: 'b'.repeat(64)
})

t.test('serves the API on the embedded database, says so, and keeps data across SIGTERM, SIGINT and kill -9', async (t) => {
  const users = [randomUUID(), randomUUID(), randomUUID()]
  let server = await start(t)
  const text = server.output.join('\n')
  t.match(text, /running on the embedded development database \(PGlite\)/, 'one clear warning')
  t.match(text, new RegExp(`"dataDir":"${dataDir}"`), 'naming where its data lives')
  const health = await (await fetch(`${server.url}/health`)).json()
  t.strictSame(health, { status: 'ok', database: 'ok', databaseKind: 'embedded' })

  const put = async (userId: string, n: number) => (await fetch(`${server.url}/api/sync/${userId}`, {
    method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(payload(n))
  })).status

  for (const [i, signal] of (['SIGTERM', 'SIGINT', 'SIGKILL'] as const).entries()) {
    const status = await put(users[i]!, i)
    t.equal(status, 200, `upload before ${signal}`)
    const { code } = await server.stop(signal)
    if (signal !== 'SIGKILL') t.equal(code, 0, `${signal} exits 0`)
    server = await start(t)
    for (let j = 0; j <= i; j++) {
      const res = await fetch(`${server.url}/api/sync/${users[j]}`)
      t.equal(res.status, 200, `after ${signal}: user ${j} is there`)
      t.strictSame(await res.json(), payload(j))
    }
  }

  const second = await runServerToExit(t, { PORT: '0', EMBEDDED_DATA_DIR: dataDir })
  t.equal(second.code, 1, 'a second process on the same data directory is refused')
  t.match(second.output, /is in use by process \d+/)

  t.equal((await server.stop('SIGTERM')).code, 0)
})

t.test('production refuses to start without DATABASE_URL', async (t) => {
  t.throws(() => loadConfig({ NODE_ENV: 'production' }), { message: /DATABASE_URL is required with NODE_ENV=production/ })
})
