import t from 'tap'
import { execFileSync } from 'node:child_process'
import { existsSync, mkdirSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import puppeteer, { type HTTPRequest, type Page } from 'puppeteer-core'
import { createTestDatabase, inspect } from '../../test/helper.ts'
import { startServer, type ServerProcess } from '../../test/server-process.ts'
import { serveExample } from '../../examples/browser/serve.ts'

// Two devices in headless Chromium (Debian's, installed by .ci/run) using examples/browser/ and
// the built client, against the real service (node server.ts) on a real PostgreSQL. The page is
// served from another port than the API, so every request is a real cross-origin one.

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const CHROMIUM = '/usr/bin/chromium'
const root = t
const SCREENSHOTS = `${ROOT}test-output/browser`

if (!existsSync(CHROMIUM)) throw new Error(`no ${CHROMIUM}: install Debian's chromium (apt-get install chromium), as .ci/run does`)
// The page loads client/dist: build it from the sources under test.
execFileSync(process.execPath, [`${ROOT}node_modules/typescript/bin/tsc`, '-p', `${ROOT}client/tsconfig.json`], { stdio: 'inherit' })

const example = await serveExample()
t.teardown(() => example.close())
const databaseUrl = await createTestDatabase(t)
const db = inspect(t, databaseUrl)
const output: string[] = []
const env = { DATABASE_URL: databaseUrl, CORS_ORIGINS: example.origin }
let service: ServerProcess = await startServer(t, { env, output })
example.setApi(service.url)

const browser = await puppeteer.launch({
  executablePath: CHROMIUM,
  headless: true,
  // Root in a container has no sandbox; this machine's network is closed, so nothing in the
  // background may try to reach Google.
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']
})
t.teardown(() => browser.close())

const pageErrors: string[] = []
async function openDevice (): Promise<Page> {
  // An isolated context of its own: its own localStorage, as another device has.
  const context = await browser.createBrowserContext()
  const page = await context.newPage()
  page.on('pageerror', (err) => pageErrors.push(String(err)))
  await page.setViewport({ width: 1000, height: 1100 })
  await page.goto(example.page, { waitUntil: 'load' })
  await page.waitForFunction(() => (document.querySelector('#api') as HTMLInputElement).value !== '')
  // The built client as the page loaded it, for the tests that call it directly (a string: the
  // test runner's TypeScript transform would rewrite an import() written here).
  await page.evaluate("import('../../client/dist/index.js').then((lib) => { window.syncClient = lib })")
  return page
}

/** Clicks a button whose action reports in the status line, and returns "ok: …" or "error: …". */
async function act (page: Page, button: string): Promise<string> {
  await page.$eval('#status', (element) => { (element as HTMLElement).dataset.state = 'waiting' })
  await page.click(`#${button}`)
  await page.waitForFunction(() => ['ok', 'error'].includes((document.querySelector('#status') as HTMLElement).dataset.state!), { timeout: 60_000 })
  return await page.$eval('#status', (element) => `${(element as HTMLElement).dataset.state}: ${element.textContent}`)
}

async function edit (page: Page, subject: string, stars: number): Promise<void> {
  await page.$eval('#subject', (element, value) => { (element as HTMLInputElement).value = value }, subject)
  await page.$eval('#stars', (element, value) => { (element as HTMLInputElement).value = value }, String(stars))
  await page.click('#save')
}

/** The progress table as "subject:stars" lines, sorted. */
async function progress (page: Page): Promise<string[]> {
  return await page.$$eval('#progress tr', (rows) =>
    rows.map((row) => `${(row as HTMLElement).dataset.subject}:${row.children[1]!.textContent!.length}`))
}

/**
 * Holds the first request of `page` that `matches` on its way (the others pass) until `release`:
 * the moment another device acts in between. `stop` ends the interception.
 */
async function holdFirst (page: Page, matches: (request: HTTPRequest) => boolean) {
  let held!: (request: HTTPRequest) => void
  const holding = new Promise<HTTPRequest>((resolve) => { held = resolve })
  let caught = false
  const hold = (request: HTTPRequest) => {
    if (!caught && matches(request)) {
      caught = true
      held(request)
    } else {
      request.continue().catch(() => {})
    }
  }
  await page.setRequestInterception(true)
  page.on('request', hold)
  return {
    holding,
    release: async () => { await (await holding).continue() },
    stop: async () => {
      page.off('request', hold)
      await page.setRequestInterception(false)
    }
  }
}

/** The service's own log: the status of every completed request of a method, in order. */
const statuses = (method: string) => output.flatMap((line) => {
  try {
    const entry = JSON.parse(line)
    return entry.msg === 'request completed' && entry.req?.method === method ? [entry.res.statusCode as number] : []
  } catch {
    return []
  }
})

const a = await openDevice()
const b = await openDevice()

t.test('device A creates an account and uploads; device B pairs with its code and downloads the same data', async (t) => {
  t.not(new URL(service.url).port, new URL(example.origin).port, 'the page and the API are on different origins')
  t.match(await act(a, 'create'), /^ok: account created/)
  const code = await a.$eval('#pairing', (element) => element.textContent!)
  t.match(code, /^[0-9a-f-]{36}\.[A-Za-z0-9_-]{43}$/, 'user id and key: the text a QR code would carry')
  await edit(a, 'math', 3)
  t.match(await act(a, 'sync'), /^ok: synced/)
  const userId = code.split('.')[0]
  const stored = (await db.query('SELECT v.ciphertext, d.token_hash FROM user_sync_versions v JOIN user_sync_data d USING (user_id) WHERE user_id = $1', [userId])).rows
  t.equal(stored.length, 1)
  t.notOk(stored[0].ciphertext.includes('math'), 'the service holds ciphertext only')
  t.equal(stored[0].token_hash.length, 32, 'claimed with the token derived from the key')

  await b.$eval('#pair-code', (element, value) => { (element as HTMLInputElement).value = value }, code)
  t.match(await act(b, 'pair'), /^ok: paired and downloaded/)
  t.strictSame(await progress(b), ['math:3'])
})

t.test('both devices edit and sync: the merge keeps both changes, through a real 412', async (t) => {
  await edit(a, 'logic', 4)
  await edit(b, 'music', 5)
  await service.loggedSoFar()
  const refusedBefore = statuses('PUT').filter((status) => status === 412).length
  t.match(await act(a, 'sync'), /^ok: synced/)
  t.match(await act(b, 'sync'), /^ok: synced/)
  t.match(await act(a, 'sync'), /^ok: synced/)
  t.strictSame(await progress(a), ['logic:4', 'math:3', 'music:5'])
  t.strictSame(await progress(b), ['logic:4', 'math:3', 'music:5'])
  await service.loggedSoFar()
  t.equal(statuses('PUT').filter((status) => status === 412).length, refusedBefore, 'B pulled before pushing: no 412 needed')

  // Now B's upload is held on its way until A has uploaded: the service refuses it (412), and
  // B pulls A's version, merges and uploads again.
  await edit(b, 'art', 2)
  // A subject named like an Object.prototype property is a subject like any other.
  await edit(b, 'constructor', 1)
  await edit(a, 'chess', 1)
  const upload = await holdFirst(b, (request) => request.method() === 'PUT')
  const syncB = act(b, 'sync')
  await upload.holding
  t.match(await act(a, 'sync'), /^ok: synced/)
  await upload.release()
  t.match(await syncB, /^ok: synced/)
  await upload.stop()
  await service.loggedSoFar()
  t.equal(statuses('PUT').filter((status) => status === 412).length, refusedBefore + 1, 'B\'s held upload was refused once')
  t.match(await act(a, 'sync'), /^ok: synced/)
  t.strictSame(await progress(a), ['art:2', 'chess:1', 'constructor:1', 'logic:4', 'math:3', 'music:5'])
  t.strictSame(await progress(b), await progress(a))
  mkdirSync(SCREENSHOTS, { recursive: true })
  await a.screenshot({ path: `${SCREENSHOTS}/two-devices.png`, fullPage: true })
  t.comment(`screenshot: ${SCREENSHOTS}/two-devices.png`)
})

t.test('a 1,000,000-byte record round trips between the two browsers; one byte more is refused before sending', async (t) => {
  const sent = await a.evaluate(async () => {
    const lib = (window as unknown as { syncClient: typeof import('../src/index.ts') }).syncClient
    const key = await lib.generateKey()
    const userId = lib.newUserId()
    // A JSON string of n characters encrypts to n + 2 (quotes) + 16 (GCM tag) bytes.
    const hex = (bytes: Uint8Array) => Array.from(bytes, (byte) => byte.toString(16).padStart(2, '0')).join('')
    let text = ''
    while (text.length < 1_000_000) text += hex(crypto.getRandomValues(new Uint8Array(65_536)))
    text = text.slice(0, 1_000_000 - 18)
    const client = new lib.SyncClient({ baseUrl: (document.querySelector('#api') as HTMLInputElement).value, userId, key })
    await client.upload(text)
    const tooLarge = await client.upload(text + 'x').then(() => 'stored', (err: { kind: string }) => err.kind)
    const digest = hex(new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(text))))
    return { userId, key: await lib.exportKey(key), digest, length: text.length, tooLarge }
  })
  t.equal(sent.tooLarge, 'too-large')
  const size = (await db.query('SELECT blob_size FROM user_sync_versions WHERE user_id = $1', [sent.userId])).rows
  t.strictSame(size, [{ blob_size: 1_000_000 }], 'one version, exactly the limit')
  const received = await b.evaluate(async ({ userId, key }) => {
    const lib = (window as unknown as { syncClient: typeof import('../src/index.ts') }).syncClient
    const client = new lib.SyncClient({ baseUrl: (document.querySelector('#api') as HTMLInputElement).value, userId, key: await lib.importKey(key) })
    const text = await client.download() as string
    const digest = Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(text))),
      (byte) => byte.toString(16).padStart(2, '0')).join('')
    return { digest, length: text.length }
  }, { userId: sent.userId, key: sent.key })
  t.strictSame(received, { digest: sent.digest, length: sent.length })
})

t.test('with the service stopped a sync fails with the typed error; after a restart it syncs the edit', async (t) => {
  const port = service.port
  await service.stop()
  await edit(a, 'physics', 4)
  t.match(await act(a, 'sync'), /^error: unavailable: the service could not be reached \(3 tries\)/)
  t.strictSame(await progress(a), ['art:2', 'chess:1', 'constructor:1', 'logic:4', 'math:3', 'music:5', 'physics:4'], 'the edit is still on the device')
  // Owned by the whole file, not this test: the next tests use it.
  service = await startServer(root, { env: { ...env, PORT: String(port) }, output })
  t.match(await act(a, 'sync'), /^ok: synced/)
  t.match(await act(b, 'sync'), /^ok: synced/)
  t.strictSame(await progress(b), ['art:2', 'chess:1', 'constructor:1', 'logic:4', 'math:3', 'music:5', 'physics:4'], 'the other device has it')
})

t.test('the versions list, and a restore that the other device then receives', async (t) => {
  t.match(await act(a, 'list'), /^ok: \d+ versions/)
  const versions = await a.$$eval('#versions li', (items) => items.map((item) => ({
    version: (item as HTMLElement).dataset.version!,
    current: item.textContent!.includes('(current)'),
    restorable: item.querySelector('button') !== null
  })))
  t.ok(versions.length >= 5, `${versions.length} versions kept`)
  t.strictSame(versions.map((entry) => entry.current), [true, ...Array(versions.length - 1).fill(false)], 'newest first')
  t.strictSame(versions.map((entry) => entry.restorable), [false, ...Array(versions.length - 1).fill(true)])
  // The one before the physics edit.
  await a.$eval('#status', (element) => { (element as HTMLElement).dataset.state = 'waiting' })
  await a.click(`#versions li[data-version="${versions[1]!.version}"] button`)
  await a.waitForFunction(() => ['ok', 'error'].includes((document.querySelector('#status') as HTMLElement).dataset.state!))
  t.match(await a.$eval('#status', (element) => element.textContent), /^restored the version of/)
  t.strictSame(await progress(a), ['art:2', 'chess:1', 'constructor:1', 'logic:4', 'math:3', 'music:5'])
  t.match(await act(b, 'sync'), /^ok: synced/)
  t.strictSame(await progress(b), ['art:2', 'chess:1', 'constructor:1', 'logic:4', 'math:3', 'music:5'], 'B takes the restore, not its own copy back')
  t.match(await act(a, 'list'), /^ok: \d+ versions/)
  t.equal(await a.$$eval('#versions li', (items) => items.length), versions.length + 1, 'the restore is a new version')
})

t.test('an edit saved while a sync is on its way is kept, and the next sync uploads it', async (t) => {
  const download = await holdFirst(a, (request) => request.method() === 'GET' && request.url().includes('/api/sync/'))
  const syncing = act(a, 'sync')
  await download.holding
  await edit(a, 'geography', 2)
  await download.release()
  t.match(await syncing, /^ok: synced; newer edits wait for the next sync/)
  await download.stop()
  t.ok((await progress(a)).includes('geography:2'), 'the edit is still on the device')
  t.match(await act(a, 'sync'), /^ok: synced \(/)
  t.match(await act(b, 'sync'), /^ok: synced/)
  t.ok((await progress(b)).includes('geography:2'), 'and reached the other device')
})

t.test('a page from an origin not in CORS_ORIGINS cannot read the API; the listed one can', async (t) => {
  const elsewhere = await serveExample(service.url)
  t.teardown(() => elsewhere.close())
  const context = await browser.createBrowserContext()
  t.teardown(() => context.close())
  const stranger = await context.newPage()
  await stranger.goto(elsewhere.page, { waitUntil: 'load' })
  await stranger.waitForFunction(() => (document.querySelector('#api') as HTMLInputElement).value !== '')
  await stranger.evaluate("import('../../client/dist/index.js').then((lib) => { window.syncClient = lib })")
  const probe = async (page: Page) => await page.evaluate(async () => {
    const lib = (window as unknown as { syncClient: typeof import('../src/index.ts') }).syncClient
    const client = new lib.SyncClient({
      baseUrl: (document.querySelector('#api') as HTMLInputElement).value, userId: lib.newUserId(), key: await lib.generateKey(), retries: 0
    })
    return await client.exists().then(String, (err: { kind: string }) => err.kind)
  })
  t.equal(await probe(stranger), 'unavailable', 'the browser withholds the answer: to a page, a network error')
  t.equal(await probe(a), 'false', 'the same request from the listed origin')
})

t.test('no script error on either page', async (t) => {
  t.strictSame(pageErrors, [])
})
