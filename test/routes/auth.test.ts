import t from 'tap'
import { createHash, hkdfSync, randomBytes, randomUUID } from 'node:crypto'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import type { FastifyInstance, LightMyRequestResponse } from 'fastify'
import pg from 'pg'
import { build, createTestDatabase, databaseUrlOf, embeddedTests, insertRecords, inspect, lockWaiters } from '../helper.ts'
import { until } from '../wait.ts'

// Access tokens (issue 13, docs/sync-protocol.md "Access tokens"). The derivation is the one
// the document shows: its code block is run here as written.
const DOC = readFileSync(new URL('../../docs/sync-protocol.md', import.meta.url), 'utf8')
const SECTION = DOC.slice(DOC.indexOf('## Access tokens'), DOC.indexOf('\n## ', DOC.indexOf('## Access tokens') + 1))
const example = /```js\n([\s\S]*?)```/.exec(SECTION)?.[1]
if (example === undefined) throw new Error('docs/sync-protocol.md shows no WebCrypto example under "Access tokens"')
const exampleFile = join(mkdtempSync(join(tmpdir(), 'lk-derive-')), 'derive.mjs')
writeFileSync(exampleFile, example)
const { deriveAccessToken } = await import(pathToFileURL(exampleFile).href) as {
  deriveAccessToken: (rawKey: Uint8Array, userId: string) => Promise<string>
}

const vector = (name: string) => {
  const value = new RegExp(`^\\| ${name.replace(/[()]/g, '\\$&')} \\| \`([^\`]+)\` \\|$`, 'm').exec(SECTION)?.[1]
  if (value === undefined) throw new Error(`docs/sync-protocol.md gives no test vector "${name}"`)
  return value
}

t.test('the document\'s test vector: its WebCrypto code and an independent HKDF agree with it', async (t) => {
  const key = Buffer.from(vector('key (hex)'), 'hex')
  const userId = vector('user id')
  const token = vector('token')
  t.equal(key.length, 32)
  t.equal(await deriveAccessToken(key, userId), token, 'the example code derives the documented token')
  const independent = Buffer.from(hkdfSync('sha256', key, Buffer.from(userId.replace(/-/g, ''), 'hex'),
    'logikids-sync/access-token v1', 32)).toString('base64url')
  t.equal(independent, token, 'node:crypto hkdfSync derives it too')
  t.match(token, /^[A-Za-z0-9_-]{43}$/)
  t.not(await deriveAccessToken(key, randomUUID()), token, 'another user id, another token')
})

// ---------------------------------------------------------------------------------------------
// Every sync route x {no token, malformed, wrong, right} x {unclaimed, claimed} x {optional, required}

/**
 * The service on a database of its own, given by DATABASE_URL also with embedded test databases
 * (whose server takes connections from several apps and from the test's own pool).
 */
async function service (t: Test, env: Record<string, string> = {}): Promise<FastifyInstance> {
  return await build(t, { env: { DATABASE_URL: env.DATABASE_URL ?? await createTestDatabase(t), ...env } })
}
/** A tap subtest (the type of the callback's argument). */
type Test = Parameters<Parameters<typeof t.test>[0]>[0]

// Both modes in the default configuration (rate limits and failure limit on), on one database.
const optional = await service(t)
const required = await service(t, { AUTH_MODE: 'required', DATABASE_URL: databaseUrlOf(optional) })
// For the tests that send more refusals from one address than AUTH_FAILURE_LIMIT, or more
// requests for one user than RATE_LIMIT_MAX: both limits are tested on their own further down.
const lenient = await service(t, { AUTH_FAILURE_LIMIT: '0', RATE_LIMIT_MAX: '0', DATABASE_URL: databaseUrlOf(optional) })
const db = inspect(t, databaseUrlOf(optional))

const sha256 = (token: string) => createHash('sha256').update(token).digest()
const newToken = () => randomBytes(32).toString('base64url')

let fill = 0
function payload (bytes = 48) {
  fill++
  return {
    encryptedBlob: Buffer.alloc(bytes, fill).toString('base64'),
    iv: 'AbCdEfGhIjKl+/9z',
    timestamp: 1_732_780_800_000 + fill,
    checksum: (fill % 16).toString(16).repeat(64)
  }
}
const url = (userId: string, rest = '') => `/api/sync/${userId}${rest}`
const bearer = (token: string) => ({ authorization: `Bearer ${token}` })

/** The whole stored record, every column of the account and of each version, as PostgreSQL holds it (null when there is none). */
async function row (userId: string, pool: pg.Pool = db): Promise<Record<string, unknown> | null> {
  const { rows } = await pool.query(`SELECT to_jsonb(u) || jsonb_build_object('versions',
      (SELECT jsonb_agg(to_jsonb(v) ORDER BY v.version) FROM user_sync_versions v WHERE v.user_id = u.user_id)) AS row
    FROM user_sync_data u WHERE user_id = $1`, [userId])
  return rows[0]?.row ?? null
}
async function storedHash (userId: string, pool: pg.Pool = db): Promise<Buffer | null> {
  const { rows } = await pool.query('SELECT token_hash FROM user_sync_data WHERE user_id = $1', [userId])
  return rows[0]?.token_hash ?? null
}

type Route = 'PUT' | 'GET' | 'HEAD' | 'verify' | 'DELETE' | 'token'
type Credential = 'none' | 'malformed' | 'wrong' | 'right'
const ROUTES: Route[] = ['PUT', 'GET', 'HEAD', 'verify', 'DELETE', 'token']
const CREDENTIALS: Credential[] = ['none', 'malformed', 'wrong', 'right']

function send (app: FastifyInstance, route: Route, userId: string, headers: Record<string, string>, body: object, rotateTo: string, remoteAddress: string) {
  switch (route) {
    case 'PUT': return app.inject({ method: 'PUT', url: url(userId), headers, payload: body, remoteAddress })
    case 'GET': return app.inject({ method: 'GET', url: url(userId), headers, remoteAddress })
    case 'HEAD': return app.inject({ method: 'HEAD', url: url(userId), headers, remoteAddress })
    case 'verify': return app.inject({ method: 'POST', url: `${url(userId)}/verify`, headers, remoteAddress })
    case 'DELETE': return app.inject({ method: 'DELETE', url: url(userId), headers, remoteAddress })
    case 'token': return app.inject({ method: 'PUT', url: `${url(userId)}/token`, headers, payload: { token: rotateTo }, remoteAddress })
  }
}

/**
 * What the protocol promises: 401 with its header, 200, 200 on /verify without the ETag, or
 * 409 for a rotation on a record that has no token to replace.
 */
function expected (route: Route, credential: Credential, claimed: boolean, mode: 'optional' | 'required'): '401 missing' | '401 invalid' | 'ok' | 'exists only' | '409' {
  if (credential === 'malformed') return '401 invalid'
  if (credential === 'none' && (mode === 'required' || route === 'token')) return '401 missing'
  if (claimed && credential === 'none') return route === 'verify' ? 'exists only' : '401 missing'
  if (claimed && credential === 'wrong') return route === 'verify' ? 'exists only' : '401 invalid'
  if (!claimed && route === 'token') return '409'
  return 'ok'
}

t.test('the access matrix: status, error shape, headers, and the row unchanged after every refusal', async (t) => {
  let cases = 0
  for (const [mode, app] of [['optional', optional], ['required', required]] as const) {
    for (const claimed of [false, true]) {
      for (const route of ROUTES) {
        for (const credential of CREDENTIALS) {
          const name = `${mode}, ${claimed ? 'claimed' : 'unclaimed'}, ${route}, ${credential} token`
          const userId = randomUUID()
          const owner = newToken()
          const original = payload()
          // Each case from an address of its own: the failure limit (20 per address) is not what it tests.
          const address = `10.${mode === 'optional' ? 1 : 2}.${cases >> 8}.${cases & 255}`
          const seeded = await optional.inject({ method: 'PUT', url: url(userId), headers: claimed ? bearer(owner) : {}, payload: original, remoteAddress: address })
          if (seeded.statusCode !== 200) throw new Error(`seeding failed: ${seeded.body}`)
          const before = await row(userId)
          const sent = { none: undefined, malformed: 'not a token!', wrong: newToken(), right: owner }[credential]
          const headers: Record<string, string> = sent === undefined ? {} : { authorization: `Bearer ${sent}` }
          const upload = payload()
          const rotateTo = newToken()
          const res = await send(app, route, userId, headers, upload, rotateTo, address)
          const outcome = expected(route, credential, claimed, mode)
          cases++

          if (outcome.startsWith('401')) {
            t.equal(res.statusCode, 401, `${name}: 401`)
            t.equal(res.headers['www-authenticate'],
              outcome === '401 missing' ? 'Bearer realm="logikids-sync"' : 'Bearer realm="logikids-sync", error="invalid_token"',
              `${name}: WWW-Authenticate`)
            if (route !== 'HEAD') t.strictSame(Object.keys(res.json()).sort(), ['error', 'statusCode'], `${name}: the error shape`)
            if (route !== 'HEAD') t.equal(res.json().statusCode, 401)
            t.equal(res.headers.etag, undefined, `${name}: no ETag`)
            t.strictSame(await row(userId), before, `${name}: the row is unchanged`)
            continue
          }
          if (outcome === '409') {
            t.equal(res.statusCode, 409, `${name}: 409, no token to replace`)
            t.match(res.json(), { statusCode: 409, error: /no access token to replace/ })
            t.strictSame(await row(userId), before, `${name}: the record stays unclaimed`)
            continue
          }
          t.equal(res.statusCode, 200, `${name}: 200 (${res.body.slice(0, 100)})`)
          t.equal(res.headers['www-authenticate'], undefined)
          const tokenSent = credential === 'wrong' || credential === 'right' ? sha256(sent!) : null
          switch (route) {
            case 'PUT': {
              const after = await row(userId)
              t.ok(Number(after?.version) > Number(before?.version), `${name}: stored`)
              t.strictSame(res.json(), { success: true })
              t.equal(res.headers.etag, `"${String(after?.etag)}"`)
              // A claimed record keeps its owner's token; an unclaimed one is claimed by the token sent, if any.
              t.strictSame(await storedHash(userId), claimed ? sha256(owner) : tokenSent, `${name}: the token hash`)
              break
            }
            case 'GET':
              t.strictSame(res.json(), original, `${name}: the data`)
              t.equal(res.headers.etag, `"${String(before?.etag)}"`)
              break
            case 'HEAD':
              t.equal(res.headers.etag, `"${String(before?.etag)}"`, `${name}: the ETag`)
              break
            case 'verify':
              t.strictSame(res.json(), { exists: true })
              if (outcome === 'exists only') {
                t.equal(res.headers.etag, undefined, `${name}: exists, without the ETag`)
                t.strictSame(await row(userId), before)
              } else {
                t.equal(res.headers.etag, `"${String(before?.etag)}"`, `${name}: exists, with the ETag`)
              }
              break
            case 'DELETE':
              t.strictSame(res.json(), { success: true })
              t.equal(await row(userId), null, `${name}: deleted`)
              break
            case 'token':
              t.strictSame(res.json(), { success: true })
              t.strictSame(await storedHash(userId), sha256(rotateTo), `${name}: the new token's hash is stored`)
              t.equal((await row(userId))?.etag, before?.etag, 'the data and its version are untouched')
              break
          }
        }
      }
    }
  }
  t.equal(cases, 2 * 2 * ROUTES.length * CREDENTIALS.length, `${cases} cases`)
})

t.test('a record nobody has: 404 with or without a token (required mode: 401 without)', async (t) => {
  const userId = randomUUID()
  t.equal((await optional.inject({ method: 'GET', url: url(userId) })).statusCode, 404)
  t.equal((await optional.inject({ method: 'GET', url: url(userId), headers: bearer(newToken()) })).statusCode, 404)
  t.equal((await optional.inject({ method: 'PUT', url: `${url(userId)}/token`, headers: bearer(newToken()), payload: { token: newToken() } })).statusCode, 404)
  t.equal((await required.inject({ method: 'GET', url: url(userId) })).statusCode, 401)
  t.equal((await required.inject({ method: 'GET', url: url(userId), headers: bearer(newToken()) })).statusCode, 404)
  t.equal(await row(userId), null, 'nothing was created')
})

t.test('conditional requests on a claimed record: authorization first, then the precondition', async (t) => {
  const userId = randomUUID()
  const owner = newToken()
  const etag = (await lenient.inject({ method: 'PUT', url: url(userId), headers: bearer(owner), payload: payload() })).headers.etag as string
  const before = await row(userId)
  for (const headers of [{ 'if-match': '"1-stale"' }, { 'if-match': etag }, { 'if-match': '*' }, { 'if-none-match': '*' }]) {
    const label = JSON.stringify(headers)
    const stranger = await lenient.inject({ method: 'PUT', url: url(userId), headers: { ...headers, ...bearer(newToken()) }, payload: payload() })
    t.equal(stranger.statusCode, 401, `${label}, wrong token: 401, not 412`)
    t.equal(stranger.headers.etag, undefined, `${label}: the current ETag is not told`)
    const deleting = await lenient.inject({ method: 'DELETE', url: url(userId), headers: { 'if-match': headers['if-match'] ?? '*' } })
    t.equal(deleting.statusCode, 401, `${label}: DELETE without a token: 401`)
  }
  const both = await lenient.inject({ method: 'PUT', url: url(userId), headers: { 'if-match': etag, 'if-none-match': '*' }, payload: payload() })
  t.equal(both.statusCode, 401, 'If-Match with If-None-Match: * and no token: 401')
  t.equal(both.headers.etag, undefined)
  t.strictSame(await row(userId), before, 'nothing changed')
  const stale = await lenient.inject({ method: 'PUT', url: url(userId), headers: { 'if-match': '"1-stale"', ...bearer(owner) }, payload: payload() })
  t.equal(stale.statusCode, 412, 'the owner with a stale version: 412')
  t.equal(stale.headers.etag, etag, 'and is told the current ETag')
  const current = await lenient.inject({ method: 'PUT', url: url(userId), headers: { 'if-match': etag, ...bearer(owner) }, payload: payload() })
  t.equal(current.statusCode, 200)
  const notModified = await lenient.inject({ method: 'GET', url: url(userId), headers: { 'if-none-match': current.headers.etag as string, ...bearer(owner) } })
  t.equal(notModified.statusCode, 304)
  const strangerPoll = await lenient.inject({ method: 'GET', url: url(userId), headers: { 'if-none-match': current.headers.etag as string } })
  t.equal(strangerPoll.statusCode, 401, 'a stranger guessing the ETag learns nothing from a 304')
  const gone = await lenient.inject({ method: 'DELETE', url: url(userId), headers: { 'if-match': current.headers.etag as string, ...bearer(owner) } })
  t.equal(gone.statusCode, 200)
  t.equal(await row(userId), null)
})

t.test('an unauthorized GET does not count as an access (the inactivity clock is not reset)', async (t) => {
  const userId = randomUUID()
  await optional.inject({ method: 'PUT', url: url(userId), headers: bearer(newToken()), payload: payload() })
  await db.query("UPDATE user_sync_data SET last_accessed = now() - interval '400 days' WHERE user_id = $1", [userId])
  const before = await row(userId)
  t.equal((await optional.inject({ method: 'GET', url: url(userId) })).statusCode, 401)
  t.strictSame(await row(userId), before)
})

t.test('the inactive-account cleanup deletes claimed records like any other', async (t) => {
  const [claimedUser, openUser, activeUser] = [randomUUID(), randomUUID(), randomUUID()]
  await optional.inject({ method: 'PUT', url: url(claimedUser), headers: bearer(newToken()), payload: payload() })
  await optional.inject({ method: 'PUT', url: url(openUser), payload: payload() })
  await optional.inject({ method: 'PUT', url: url(activeUser), headers: bearer(newToken()), payload: payload() })
  await db.query("UPDATE user_sync_data SET last_accessed = now() - interval '800 days' WHERE user_id = ANY($1::uuid[])", [[claimedUser, openUser]])
  t.equal(await optional.storage.deleteInactive(730), 2)
  t.equal(await row(claimedUser), null, 'the claimed record is gone')
  t.equal(await row(openUser), null)
  t.ok(await row(activeUser), 'an active claimed record stays')
})

t.test('rotation: the new token works at once, the old one fails at once', async (t) => {
  const userId = randomUUID()
  const [first, second, third] = [newToken(), newToken(), newToken()]
  const data = payload()
  await lenient.inject({ method: 'PUT', url: url(userId), headers: bearer(first), payload: data })
  const rotated = await lenient.inject({ method: 'PUT', url: `${url(userId)}/token`, headers: bearer(first), payload: { token: second } })
  t.equal(rotated.statusCode, 200)
  t.equal(rotated.body, '{"success":true}')
  t.equal((await lenient.inject({ method: 'GET', url: url(userId), headers: bearer(first) })).statusCode, 401, 'the old token fails')
  const got = await lenient.inject({ method: 'GET', url: url(userId), headers: bearer(second) })
  t.equal(got.statusCode, 200, 'the new token reads')
  t.strictSame(got.json(), data)
  t.equal((await lenient.inject({ method: 'PUT', url: `${url(userId)}/token`, headers: bearer(first), payload: { token: third } })).statusCode, 401,
    'the old token cannot rotate again')
  // The storage retries a statement once when its connection is lost on the way back: the
  // retry of a rotation that committed finds the new token already there, and is a success.
  t.equal(await lenient.storage.setToken(userId, sha256(first), sha256(second)), 'replaced', 'the same rotation again: replaced')
  t.strictSame(await storedHash(userId), sha256(second))
  const bad = await lenient.inject({ method: 'PUT', url: `${url(userId)}/token`, headers: bearer(second), payload: { token: 'short' } })
  t.equal(bad.statusCode, 400, 'a new token that is not one: 400')
  t.match(bad.json().error, /token/)
  t.notMatch(bad.body, /short/, 'the value is not echoed')
  t.strictSame(await storedHash(userId), sha256(second), 'refused rotations changed nothing')
  // An unclaimed record has no token to replace: a stranger cannot claim one this way.
  const open = randomUUID()
  await lenient.inject({ method: 'PUT', url: url(open), payload: data })
  const claiming = await lenient.inject({ method: 'PUT', url: `${url(open)}/token`, headers: bearer(first), payload: { token: second } })
  t.equal(claiming.statusCode, 409)
  t.equal(await storedHash(open), null, 'the record stays unclaimed')
  t.equal((await lenient.inject({ method: 'GET', url: url(open) })).statusCode, 200, 'and open to its old clients')
  // Another scheme is not a token: a proxy's Basic credentials neither help nor break anything.
  const basic = await lenient.inject({ method: 'GET', url: url(userId), headers: { authorization: 'Basic dXNlcjpwYXNz' } })
  t.equal(basic.statusCode, 401)
  t.equal(basic.headers['www-authenticate'], 'Bearer realm="logikids-sync"')
  t.equal((await lenient.inject({ method: 'GET', url: url(userId), headers: { authorization: `bearer  ${second}` } })).statusCode, 200,
    'the scheme is case-insensitive')
  t.equal((await lenient.inject({ method: 'GET', url: url(userId), headers: { authorization: `Bearer\t${second}` } })).statusCode, 200,
    'a tab after the scheme is taken as a space')
  const tabbed = randomUUID()
  t.equal((await lenient.inject({ method: 'PUT', url: url(tabbed), headers: { authorization: `Bearer\t${third}` }, payload: data })).statusCode, 200)
  t.strictSame(await storedHash(tabbed), sha256(third), 'and claims like any token (never silently none)')
})

// Two devices claim one unclaimed record at once with different tokens. On PostgreSQL the test
// forces the interleaving: it holds the row (or an uncommitted insert of it), both uploads start
// and are seen waiting, then it lets go; each round exactly one claims. The embedded database
// has one session for all connections, so there the uploads race unforced.
t.test('two devices claiming one record at the same moment: exactly one wins, every time', async (t) => {
  const embedded = embeddedTests()
  const connect = async (name: string) => {
    const client = new pg.Client({ connectionString: databaseUrlOf(optional), application_name: name })
    await client.connect()
    t.teardown(() => client.end())
    return client
  }
  const holder = embedded ? undefined : await connect('lock holder')
  const observer = embedded ? undefined : await connect('observer')
  const waiting = async () => (await lockWaiters(observer!)).length
  // Rounds cycle through: a record an old client uploaded, a new record (plain PUTs), and a new
  // record created with If-None-Match: * (the first upload of a new account).
  for (let round = 1; round <= 12; round++) {
    const userId = randomUUID()
    const existing = round % 3 === 1
    const createOnly = round % 3 === 0
    if (existing) await lenient.inject({ method: 'PUT', url: url(userId), payload: payload() })
    if (holder !== undefined) {
      await holder.query('BEGIN')
      if (existing) {
        await holder.query('SELECT 1 FROM user_sync_data WHERE user_id = $1 FOR UPDATE', [userId])
      } else {
        // An upload by an old client, not yet committed: both claims wait on the key.
        await holder.query(insertRecords("SELECT $1::uuid, 'AAAA', 'AAAAAAAAAAAAAAAA', 1::bigint, $2::text, 3, now()"), [userId, 'f'.repeat(64)])
      }
    }
    const tokens = [newToken(), newToken()]
    const contenders = [payload(), payload()]
    const racing = Promise.all(tokens.map((token, i) => lenient.inject({
      method: 'PUT', url: url(userId), headers: { ...bearer(token), ...(createOnly ? { 'if-none-match': '*' } : {}) }, payload: contenders[i]
    })))
    if (holder !== undefined) {
      await until(async () => await waiting() >= 2, `round ${round}: both claims wait`, 10_000)
      // A committed old upload would make If-None-Match: * fail for both: those rounds roll back.
      await holder.query(!createOnly && round % 2 === 0 ? 'COMMIT' : 'ROLLBACK')
    }
    const results = await racing
    const kind = existing ? 'existing record' : createOnly ? 'new record, If-None-Match: *' : 'new record'
    t.strictSame(results.map((res) => res.statusCode).sort(), [200, 401], `round ${round} (${kind}): one 200, one 401`)
    const winner = results.findIndex((res) => res.statusCode === 200)
    t.strictSame(await storedHash(userId), sha256(tokens[winner]!), `round ${round}: the winner's token holds the record`)
    const stored = await lenient.inject({ method: 'GET', url: url(userId), headers: bearer(tokens[winner]!) })
    t.strictSame(stored.json(), contenders[winner], `round ${round}: and its data`)
  }
})

// ---------------------------------------------------------------------------------------------
// The failure limit and the per-user budget, in the default configuration (20 failures per IP
// per hour, 100 requests per user per hour, 2000 per IP).

t.test('failures from one address turn into 429; the owner behind that address is never locked out', async (t) => {
  const app = await service(t)
  const userId = randomUUID()
  const owner = newToken()
  const data = payload()
  const office = '203.0.113.7'
  t.equal((await app.inject({ method: 'PUT', url: url(userId), headers: bearer(owner), payload: data, remoteAddress: '198.51.100.1' })).statusCode, 200)
  const statuses: number[] = []
  let last: LightMyRequestResponse | undefined
  for (let i = 0; i < 25; i++) {
    const credential: Record<string, string> = i % 3 === 0 ? {} : i % 3 === 1 ? bearer(newToken()) : { authorization: 'Bearer !' }
    last = await app.inject({ method: 'GET', url: url(userId), headers: credential, remoteAddress: office })
    statuses.push(last.statusCode)
  }
  t.strictSame(statuses, [...Array(20).fill(401), ...Array(5).fill(429)], '20 refusals answered 401, then 429')
  t.match(last?.headers['retry-after'], /^[0-9]+$/, '429 says when to retry')
  t.strictSame(Object.keys(last!.json()).sort(), ['error', 'statusCode'])
  const own = await app.inject({ method: 'GET', url: url(userId), headers: bearer(owner), remoteAddress: office })
  t.equal(own.statusCode, 200, 'the right token from the same address still works')
  t.strictSame(own.json(), data)
  t.equal((await app.inject({ method: 'PUT', url: url(userId), headers: bearer(owner), payload: payload(), remoteAddress: office })).statusCode, 200)
  const elsewhere = await app.inject({ method: 'GET', url: url(userId), headers: bearer(newToken()), remoteAddress: '192.0.2.99' })
  t.equal(elsewhere.statusCode, 401, 'another address has its own count')
})

t.test('refused requests (no token, a wrong one, a malformed one) do not spend the owner\'s per-user budget', async (t) => {
  const app = await service(t)
  const userId = randomUUID()
  const owner = newToken()
  await app.inject({ method: 'PUT', url: url(userId), headers: bearer(owner), payload: payload(), remoteAddress: '198.51.100.1' })
  // 150 refusals (more than the per-user limit of 100), each from an address of its own, so
  // that the failure limit (per address) is not what stops them.
  const statuses = new Set<number>()
  for (let i = 0; i < 150; i++) {
    const credential = [{}, bearer(newToken()), { authorization: 'Bearer %%%' }][i % 3]!
    statuses.add((await app.inject({ method: 'DELETE', url: url(userId), headers: credential, remoteAddress: `10.1.${i >> 8}.${i & 255}` })).statusCode)
  }
  t.strictSame([...statuses], [401], 'every one refused with 401')
  const own = await app.inject({ method: 'GET', url: url(userId), headers: bearer(owner), remoteAddress: '198.51.100.1' })
  t.equal(own.statusCode, 200, 'the owner still reads')
  t.equal(own.headers['x-ratelimit-remaining'], '98', 'and has spent only its own two requests of 100')
  t.ok(await row(userId, inspect(t, databaseUrlOf(app))), 'the record is still there')
})

// ---------------------------------------------------------------------------------------------

t.test('a WebCrypto client: derives the token from its key, encrypts, syncs; a second device with the key reads, others cannot', async (t) => {
  const app = await service(t)
  const base = await app.listen({ port: 0, host: '127.0.0.1' })
  const userId = randomUUID()
  const rawKey = crypto.getRandomValues(new Uint8Array(32))
  const key = await crypto.subtle.importKey('raw', rawKey, 'AES-GCM', false, ['encrypt', 'decrypt'])
  const token = await deriveAccessToken(rawKey, userId)
  const iv = crypto.getRandomValues(new Uint8Array(12))
  const plaintext = new TextEncoder().encode(JSON.stringify({ stars: 42, level: 'fractions' }))
  const ciphertext = new Uint8Array(await crypto.subtle.encrypt({ name: 'AES-GCM', iv }, key, plaintext))
  const body = {
    encryptedBlob: Buffer.from(ciphertext).toString('base64'),
    iv: Buffer.from(iv).toString('base64'),
    timestamp: Date.now(),
    checksum: Buffer.from(await crypto.subtle.digest('SHA-256', ciphertext)).toString('hex')
  }
  const put = await fetch(`${base}${url(userId)}`, {
    method: 'PUT', headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` }, body: JSON.stringify(body)
  })
  t.equal(put.status, 200)
  t.strictSame(await storedHash(userId, inspect(t, databaseUrlOf(app))), sha256(token), 'the upload claimed the record with the token\'s hash, not the token')

  // The second device scanned the same key from the QR code: it derives the same token.
  const secondToken = await deriveAccessToken(new Uint8Array(rawKey), userId)
  const got = await fetch(`${base}${url(userId)}`, { headers: { authorization: `Bearer ${secondToken}` } })
  t.equal(got.status, 200)
  const downloaded = await got.json() as typeof body
  const decrypted = await crypto.subtle.decrypt({ name: 'AES-GCM', iv: Buffer.from(downloaded.iv, 'base64') }, key,
    Buffer.from(downloaded.encryptedBlob, 'base64'))
  t.strictSame(JSON.parse(new TextDecoder().decode(decrypted)), { stars: 42, level: 'fractions' })

  const otherKey = crypto.getRandomValues(new Uint8Array(32))
  const stranger = await fetch(`${base}${url(userId)}`, { headers: { authorization: `Bearer ${await deriveAccessToken(otherKey, userId)}` } })
  t.equal(stranger.status, 401, 'a device with another key is refused')
  t.equal(stranger.headers.get('www-authenticate'), 'Bearer realm="logikids-sync", error="invalid_token"')
})

t.test('a browser may send the token: CORS allows Authorization and exposes WWW-Authenticate', async (t) => {
  const app = await service(t, { CORS_ORIGINS: 'https://app.example' })
  const preflight = await app.inject({
    method: 'OPTIONS',
    url: url(randomUUID()),
    headers: { origin: 'https://app.example', 'access-control-request-method': 'PUT', 'access-control-request-headers': 'authorization,content-type' }
  })
  t.equal(preflight.statusCode, 204)
  t.match(preflight.headers['access-control-allow-headers'], /Authorization/)
  const refused = await app.inject({ method: 'GET', url: url(randomUUID()), headers: { origin: 'https://app.example' } })
  t.match(refused.headers['access-control-expose-headers'], /WWW-Authenticate/)
})

t.test('no token, no hash, no refused value in any log line at debug level', async (t) => {
  const lines: string[] = []
  const app = await build(t, { env: { LOG_LEVEL: 'debug' }, logLines: lines })
  const userId = randomUUID()
  const [owner, next, wrong] = [newToken(), newToken(), newToken()]
  const malformed = 'MALFORMED.value/with+slashes'
  const requests = [
    { method: 'PUT', url: url(userId), headers: bearer(owner), payload: payload() },
    { method: 'GET', url: url(userId), headers: bearer(owner) },
    { method: 'HEAD', url: url(userId), headers: bearer(owner) },
    { method: 'POST', url: `${url(userId)}/verify`, headers: bearer(wrong) },
    { method: 'GET', url: url(userId), headers: bearer(wrong) },
    { method: 'GET', url: url(userId), headers: { authorization: `Bearer ${malformed}` } },
    { method: 'PUT', url: `${url(userId)}/token`, headers: bearer(owner), payload: { token: next } },
    { method: 'PUT', url: `${url(userId)}/token`, headers: bearer(next), payload: { token: malformed } },
    { method: 'DELETE', url: url(userId), headers: bearer(owner) },
    { method: 'DELETE', url: url(userId), headers: bearer(next) }
  ] as const
  const statuses = []
  for (const request of requests) statuses.push((await app.inject(request)).statusCode)
  t.strictSame(statuses, [200, 200, 200, 200, 401, 401, 200, 400, 401, 200], 'the requests did what they should')
  t.ok(lines.some((line) => line.includes('"level":20')), 'debug lines were written')
  t.ok(lines.length >= requests.length)
  const secrets = [owner, next, wrong, malformed, userId]
  for (const token of [owner, next, wrong]) {
    const hash = sha256(token)
    secrets.push(hash.toString('hex'), hash.toString('base64'), hash.toString('base64url'), hash.toString('base64', 0, 9))
  }
  for (const secret of secrets) {
    t.notOk(lines.some((line) => line.includes(secret)), `no line holds ${secret === userId ? 'the user id' : 'a token, a hash or a refused value'}`)
  }
})

t.test('the metrics count refusals by reason, and hold no token', async (t) => {
  const app = await service(t, { AUTH_FAILURE_LIMIT: '0' })
  const userId = randomUUID()
  const owner = newToken()
  await app.inject({ method: 'PUT', url: url(userId), headers: bearer(owner), payload: payload() })
  await app.inject({ method: 'GET', url: url(userId) })
  await app.inject({ method: 'GET', url: url(userId), headers: bearer(newToken()) })
  await app.inject({ method: 'GET', url: url(userId), headers: bearer(newToken()) })
  await app.inject({ method: 'GET', url: url(userId), headers: { authorization: 'Bearer x' } })
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(metrics, /auth_failures_total\{reason="missing"\} 1\n/)
  t.match(metrics, /auth_failures_total\{reason="wrong"\} 2\n/)
  t.match(metrics, /auth_failures_total\{reason="malformed"\} 1\n/)
  t.notOk(metrics.includes(owner))
})

t.test('a database from before access tokens: migrated at start, its records unclaimed, old clients served as before', async (t) => {
  const databaseUrl = await createTestDatabase(t)
  const old = new pg.Client({ connectionString: databaseUrl })
  await old.connect()
  for (const file of ['001_init.sql', '002_version.sql', '003_etag.sql']) {
    await old.query(readFileSync(new URL(`../../sql/${file}`, import.meta.url), 'utf8'))
  }
  const userId = randomUUID()
  const data = payload()
  // A record as the service stored it before sql/004_access_token.sql.
  await old.query(`INSERT INTO user_sync_data (user_id, encrypted_blob, iv, timestamp, checksum, blob_size, version, etag)
    VALUES ($1, $2, $3, $4, $5, $6, 3, '3-0123456789abcdef0123456789abcdef')`,
  [userId, data.encryptedBlob, data.iv, data.timestamp, data.checksum, Buffer.from(data.encryptedBlob, 'base64').length])
  await old.end()

  const app = await service(t, { DATABASE_URL: databaseUrl })
  const pool = inspect(t, databaseUrl)
  const got = await app.inject({ method: 'GET', url: url(userId) })
  t.equal(got.statusCode, 200, 'an old client (no token) reads')
  t.strictSame(got.json(), data)
  t.equal(got.headers.etag, '"3-0123456789abcdef0123456789abcdef"', 'with the tag it had')
  const listed = (await app.inject({ method: 'GET', url: url(userId, '/versions') })).json().versions
  t.match(listed, [{ version: 3, etag: '3-0123456789abcdef0123456789abcdef', current: true, size: Buffer.from(data.encryptedBlob, 'base64').length }],
    'its data is now its current version (sql/005_versions.sql)')
  const replaced = await app.inject({ method: 'PUT', url: url(userId), headers: { 'if-match': got.headers.etag as string }, payload: payload() })
  t.equal(replaced.statusCode, 200, 'and writes, conditionally')
  t.equal(await storedHash(userId, pool), null, 'the record is still unclaimed')
  t.equal((await app.inject({ method: 'DELETE', url: url(randomUUID()) })).statusCode, 200)

  // The migration path: the first upload with a token claims the record; old clients are then refused.
  const token = newToken()
  t.equal((await app.inject({ method: 'PUT', url: url(userId), headers: bearer(token), payload: payload() })).statusCode, 200)
  t.strictSame(await storedHash(userId, pool), sha256(token))
  t.equal((await app.inject({ method: 'GET', url: url(userId) })).statusCode, 401, 'an old client after the claim: 401')
})

t.test('the per-user limit holds for clients with tokens too: the owner\'s, and made-up ones', async (t) => {
  const app = await service(t)
  const [claimedUser, openUser, nobody] = [randomUUID(), randomUUID(), randomUUID()]
  const owner = newToken()
  const address = '198.51.100.7'
  const get = (userId: string, headers: Record<string, string> = {}) =>
    app.inject({ method: 'GET', url: url(userId), headers, remoteAddress: address })
  t.equal((await app.inject({ method: 'PUT', url: url(claimedUser), headers: bearer(owner), payload: payload(), remoteAddress: address })).statusCode, 200)
  const owners: number[] = []
  for (let i = 0; i < 100; i++) owners.push((await get(claimedUser, bearer(owner))).statusCode)
  t.strictSame(owners, [...Array(99).fill(200), 429], 'the owner\'s token: 100 requests (the upload and 99 reads), then 429')

  // A made-up token opens an unclaimed record but proves nothing: it also spends the budget of
  // the requests without a token, so a new token per request does not escape the limit.
  t.equal((await app.inject({ method: 'PUT', url: url(openUser), payload: payload(), remoteAddress: address })).statusCode, 200)
  const madeUp: number[] = []
  for (let i = 0; i < 100; i++) madeUp.push((await get(openUser, bearer(newToken()))).statusCode)
  t.strictSame(madeUp, [...Array(99).fill(200), 429], 'an unclaimed record: 100 requests, then 429')
  t.equal((await get(openUser)).statusCode, 429, 'and the requests without a token share that budget')
  const absent: number[] = []
  for (let i = 0; i < 101; i++) absent.push((await get(nobody, bearer(newToken()))).statusCode)
  t.strictSame(absent, [...Array(100).fill(404), 429], 'no record: 100 requests, then 429')
  // The shared budget of openUser is used up: made-up tokens get 429 wherever nothing changed...
  const stale = await app.inject({ method: 'PUT', url: url(openUser), headers: { ...bearer(newToken()), 'if-match': '"1-stale"' }, payload: payload(), remoteAddress: address })
  t.equal(stale.statusCode, 429, 'PUT with a stale If-Match and a made-up token: 429, not 412')
  const rotation = await app.inject({ method: 'PUT', url: `${url(openUser)}/token`, headers: bearer(newToken()), payload: { token: newToken() }, remoteAddress: address })
  t.equal(rotation.statusCode, 429, 'a rotation on the unclaimed record: 429, not 409')
  // ...but an answer never claims a refusal for what was done: a delete that deleted says so.
  const deleting = await app.inject({ method: 'DELETE', url: url(openUser), headers: bearer(newToken()), remoteAddress: address })
  t.equal(deleting.statusCode, 200, 'a DELETE that deleted the unclaimed record: 200')
  const gone = await app.inject({ method: 'DELETE', url: url(openUser), headers: bearer(newToken()), remoteAddress: address })
  t.equal(gone.statusCode, 429, 'the next, which deletes nothing: 429')
})

t.test('the owner\'s stale If-Match is a 412, not a 429, after strangers used up the shared budget', async (t) => {
  const app = await service(t)
  const userId = randomUUID()
  const owner = newToken()
  const etag = (await app.inject({ method: 'PUT', url: url(userId), headers: bearer(owner), payload: payload() })).headers.etag as string
  await app.inject({ method: 'PUT', url: url(userId), headers: bearer(owner), payload: payload() })
  for (let i = 0; i < 105; i++) await app.inject({ method: 'POST', url: `${url(userId)}/verify`, remoteAddress: '192.0.2.2' })
  t.equal((await app.inject({ method: 'POST', url: `${url(userId)}/verify`, remoteAddress: '192.0.2.2' })).statusCode, 429, 'the shared budget is used up')
  for (const method of ['DELETE', 'PUT'] as const) {
    const stale = await app.inject({ method, url: url(userId), headers: { ...bearer(owner), 'if-match': etag }, ...(method === 'PUT' ? { payload: payload() } : {}) })
    t.equal(stale.statusCode, 412, `${method} with a stale If-Match: 412`)
    t.ok(stale.headers.etag, 'with the current ETag')
  }
  t.equal((await app.inject({ method: 'GET', url: url(userId), headers: bearer(owner) })).statusCode, 200)
})

// Racing conditional writes with one token (one user's devices) must queue on the row, never
// deadlock: the share lock that reads the current tag is taken after the write. On PostgreSQL
// the test holds the row, lets all writes start and wait, then lets go; a deadlock would show
// as PostgreSQL rolling a statement back (logged at warn) and as 503s.
t.test('conditional writes and a rotation racing on one record queue on the row: no deadlock, the outcomes in order', async (t) => {
  const lines: string[] = []
  const databaseUrl = await createTestDatabase(t)
  const app = await build(t, { env: { DATABASE_URL: databaseUrl, LOG_LEVEL: 'warn', RATE_LIMIT_MAX: '0' }, logLines: lines })
  const pool = inspect(t, databaseUrl)
  const embedded = embeddedTests()
  const holder = embedded ? undefined : new pg.Client({ connectionString: databaseUrl, application_name: 'lock holder' })
  await holder?.connect()
  t.teardown(() => holder?.end())
  const waiting = async () => (await lockWaiters(pool)).length
  /** Holds the row while `start` sends its requests one by one, each seen waiting before the next. */
  async function queued<T> (userId: string, requests: Array<() => Promise<T>>): Promise<T[]> {
    if (holder === undefined) {
      // The embedded database serves one statement at a time: queue them by sending in order.
      const answers: T[] = []
      for (const send of requests) answers.push(await send())
      return answers
    }
    await holder.query('BEGIN')
    await holder.query('SELECT 1 FROM user_sync_data WHERE user_id = $1 FOR UPDATE', [userId])
    const sent: Array<Promise<T>> = []
    for (const [i, send] of requests.entries()) {
      sent.push(send())
      await until(async () => await waiting() >= i + 1, `request ${i + 1} waits for the row`, 10_000)
    }
    await holder.query('COMMIT')
    return await Promise.all(sent)
  }
  const userId = randomUUID()
  const [first, second] = [newToken(), newToken()]
  const put = (headers: Record<string, string>) => () => app.inject({ method: 'PUT', url: url(userId), headers, payload: payload() })
  const etag = (await put(bearer(first))()).headers.etag as string

  const any = await queued(userId, [put({ ...bearer(first), 'if-match': '*' }), put({ ...bearer(first), 'if-match': '*' }), put({ ...bearer(first), 'if-match': '*' })])
  t.strictSame(any.map((res) => res.statusCode), [200, 200, 200], 'If-Match: * three times: all stored')
  // Three waiters on one row: PostgreSQL keeps its waiters in order on one row version only; the
  // second and third follow the update chain to the version the first wrote and race for it
  // (one CI run on a loaded machine stored them 1, 3, 2). Two waiters, as below, keep their order.
  const stored = any.map((res) => Number(String(res.headers.etag).slice(1).split('-')[0]))
  t.equal(new Set(stored).size, 3, 'one version each')
  t.equal(Number((await row(userId, pool))?.version), Math.max(...stored), 'the newest current')

  const current = any[stored.indexOf(Math.max(...stored))]!.headers.etag as string
  const same = await queued(userId, [put({ ...bearer(first), 'if-match': current }), put({ ...bearer(first), 'if-match': current })])
  t.strictSame(same.map((res) => res.statusCode), [200, 412], 'the same If-Match twice: the first stored, the second 412')
  t.equal(same[1]!.headers.etag, same[0]!.headers.etag, 'and told the winner\'s ETag')
  t.not(etag, current)

  const rotation = () => app.inject({ method: 'PUT', url: `${url(userId)}/token`, headers: bearer(first), payload: { token: second } })
  const [rotated, late] = await queued(userId, [rotation, put(bearer(first))])
  t.equal(rotated!.statusCode, 200, 'the rotation, queued first, replaced the token')
  t.equal(late!.statusCode, 401, 'the upload with the old token, queued behind it, is refused')
  t.strictSame(await storedHash(userId, pool), sha256(second))

  // The new token, in a request queued behind the rotation that sets it, is judged on the row as
  // the rotation left it (the statement's own snapshot still holds the old token).
  const [t1, t2, t3, t4, t5, t6, t7] = [newToken(), newToken(), newToken(), newToken(), newToken(), newToken(), newToken()]
  const rotate = (from: string, to: string) => () => app.inject({ method: 'PUT', url: `${url(userId)}/token`, headers: bearer(from), payload: { token: to } })
  const remove = (headers: Record<string, string>) => () => app.inject({ method: 'DELETE', url: url(userId), headers })
  const tagNow = async () => `"${String((await row(userId, pool))?.etag)}"`
  const statuses = (answers: Array<{ statusCode: number }>) => answers.map((res) => res.statusCode)
  t.strictSame(statuses(await queued(userId, [rotate(second, t1), put({ ...bearer(t1), 'if-match': '*' })])), [200, 200],
    'a rotation, then PUT If-Match: * with the new token: both 200')
  t.strictSame(statuses(await queued(userId, [rotate(t1, t2), rotate(t2, t3)])), [200, 200],
    'a rotation, then a rotation with the new token: both 200')
  const tag = await tagNow()
  t.strictSame(statuses(await queued(userId, [rotate(t3, t4), put({ ...bearer(t4), 'if-match': tag })])), [200, 200],
    'a rotation, then PUT If-Match: <current> with the new token: both 200')
  const last = await tagNow()
  t.strictSame(statuses(await queued(userId, [rotate(t4, t5), remove({ ...bearer(t5), 'if-match': last })])), [200, 200],
    'a rotation, then DELETE If-Match with the new token: both 200')
  t.equal(await row(userId, pool), null, 'and the record is gone')
  await put(bearer(t6))()
  t.strictSame(statuses(await queued(userId, [rotate(t6, t7), remove(bearer(t7))])), [200, 200], 'a rotation, then DELETE with the new token: both 200')
  t.equal(await row(userId, pool), null, 'and the record is gone')
  t.strictSame(lines.filter((line) => /rolled back|"level":50/.test(line)), [], 'no statement was rolled back for a deadlock, no error')
})
