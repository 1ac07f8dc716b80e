import t from 'tap'
import { randomUUID } from 'node:crypto'
import { createTestDatabase } from '../helper.ts'
import { runServerToExit, startServer, type ServerProcess } from '../server-process.ts'

// The real entry point, as `npm start` runs it (from the sources, so no build step is needed here).
const PASSWORD = 'not-a-real-pw-7Qx9'

async function stop (running: ServerProcess, signal: NodeJS.Signals): Promise<{ code: number | null, ms: number }> {
  const started = Date.now()
  const { code } = await running.stop(signal)
  return { code, ms: Date.now() - started }
}

const databaseUrl = new URL(await createTestDatabase(t))
databaseUrl.password = PASSWORD // trust auth ignores it; it is here to prove it is never logged
const env = { DATABASE_URL: databaseUrl.toString(), LOG_LEVEL: 'debug' }

t.test('serves, shuts down cleanly on SIGTERM and SIGINT, and finds its data after a restart', async (t) => {
  const lines: string[] = []
  const userId = randomUUID()
  const payload = {
    encryptedBlob: Buffer.from('a secret only the devices can read').toString('base64'),
    iv: 'Zm9vYmFyYmF6cXV4',
    timestamp: 1_732_780_800_000,
    checksum: 'c0ffee'.repeat(10) + 'beef'
  }

  const first = await startServer(t, { env, output: lines })
  const put = await fetch(`${first.url}/api/sync/${userId}`, {
    method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(payload)
  })
  t.equal(put.status, 200)
  t.equal((await fetch(`${first.url}/api/sync/${userId}`)).status, 200)
  await fetch(`${first.url}/api/sync/${userId}/verify`, { method: 'POST' })
  await fetch(`${first.url}/api/sync/${userId}x`)
  await fetch(`${first.url}/api/sync/${userId.slice(0, 30)}/verify?token=${userId}`, { method: 'POST' })
  const sigterm = await stop(first, 'SIGTERM')
  t.equal(sigterm.code, 0, 'SIGTERM exits 0')
  t.comment(`SIGTERM shutdown took ${sigterm.ms} ms`)

  const second = await startServer(t, { env, output: lines })
  const back = await fetch(`${second.url}/api/sync/${userId}`)
  t.equal(back.status, 200, 'the data survived the restart')
  t.strictSame(await back.json(), payload)
  await fetch(`${second.url}/api/sync/${userId}`, { method: 'DELETE' })
  const sigint = await stop(second, 'SIGINT')
  t.equal(sigint.code, 0, 'SIGINT exits 0')
  t.comment(`SIGINT shutdown took ${sigint.ms} ms`)

  const text = lines.join('\n')
  t.match(text, /connected to PostgreSQL/, 'start-up says where it connected')
  t.match(text, /"database":"127\.0\.0\.1:\d+\/lk_test_/)
  t.match(text, /"op":"store"/, 'storage operations are logged')
  t.match(text, /"op":"get"/)
  t.match(text, /"op":"delete"/)
  for (const [name, secret] of Object.entries({
    userId,
    userIdUpperCase: userId.toUpperCase(),
    idPrefix: userId.slice(0, 30),
    blob: payload.encryptedBlob,
    iv: payload.iv,
    checksum: payload.checksum,
    password: PASSWORD
  })) {
    t.notOk(text.includes(secret), `no ${name} in ${lines.length} log lines`)
  }
  for (const line of lines.filter((line) => line.startsWith('{'))) {
    t.doesNotThrow(() => JSON.parse(line), 'every log line is JSON')
  }
})

t.test('bad configuration: exits 1 and says what to fix', async (t) => {
  const { code, output } = await runServerToExit(t, { ...env, PORT: 'eighty' })
  t.equal(code, 1)
  t.match(output, /invalid configuration: .*PORT/)
})

t.test('database unreachable at start-up: exits 1 and names the database, not the password', async (t) => {
  const { code, output } = await runServerToExit(t, { DATABASE_URL: `postgres://u:${PASSWORD}@127.0.0.1:1/nowhere`, PORT: '0' })
  t.equal(code, 1)
  t.match(output, /cannot prepare the database at 127\.0\.0\.1:1\/nowhere/)
  t.notOk(output.includes(PASSWORD), 'the password is not printed')
})
