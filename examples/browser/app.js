// A device of the learning app: keeps a child's progress, pairs with a second device by a code
// (the text a QR code would carry), syncs through logikids-sync, and undoes an upload.
// Everything the service receives is encrypted here, with the built client (npm run build:client).
import { generateKey, exportKey, importKey, newUserId, pairingCode, readPairingCode, SyncClient } from '../../client/dist/index.js'

const STORAGE = 'logikids-sync-example'
const $ = (id) => document.getElementById(id)

// What this device keeps: the user id, the key (exported), the progress and the client's state.
// A real app keeps the key in IndexedDB as a CryptoKey; localStorage keeps the example short.
let saved = JSON.parse(localStorage.getItem(STORAGE) ?? 'null') ?? { userId: null, key: null, api: null, data: null, state: null }
let client = null

/** Per subject, the later change wins; a subject only one device has is kept. */
function mergeProgress (local, remote) {
  // A Map and fromEntries: subjects called "constructor" or "__proto__" are subjects like any other.
  const progress = new Map(Object.entries(remote?.progress ?? {}))
  for (const [subject, entry] of Object.entries(local?.progress ?? {})) {
    const other = progress.get(subject)
    if (!(Number(other?.changedAt) >= Number(entry?.changedAt))) progress.set(subject, entry)
  }
  return { progress: Object.fromEntries(progress) }
}

/** 0 to 5 stars, whatever another device stored. */
const stars = (value) => Math.min(5, Math.max(0, Math.trunc(Number(value)) || 0))

function persist () {
  if (client !== null) saved.state = client.state
  localStorage.setItem(STORAGE, JSON.stringify(saved))
}

function status (state, text) {
  $('status').dataset.state = state
  $('status').textContent = text
}

function render () {
  $('user').textContent = saved.userId ?? 'none yet'
  const rows = Object.entries(saved.data?.progress ?? {}).sort(([a], [b]) => a.localeCompare(b))
  $('progress').replaceChildren(...rows.map(([subject, entry]) => {
    const row = document.createElement('tr')
    row.dataset.subject = subject
    for (const text of [subject, '★'.repeat(stars(entry?.stars)) || '–', new Date(entry?.changedAt).toLocaleTimeString()]) {
      const cell = document.createElement('td')
      cell.textContent = text
      row.append(cell)
    }
    return row
  }))
}

async function connect (userId, key, api) {
  client = new SyncClient({
    baseUrl: api,
    userId,
    key,
    state: saved.userId === userId ? saved.state ?? undefined : undefined,
    // A page the user is looking at: give up after a few seconds rather than minutes.
    retries: 2,
    retryDelay: { baseMs: 250, maxMs: 5000 }
  })
  saved.userId = userId
  saved.key = await exportKey(key)
  saved.api = api
  $('pairing').textContent = await pairingCode(userId, key)
  persist()
  render()
}

/** Runs an action with the status line telling how it went; a typed error shows its kind. */
async function act (busy, action) {
  status('busy', busy)
  try {
    status('ok', await action())
  } catch (err) {
    status('error', `${err.kind ?? 'error'}: ${err.message}`)
  }
}

$('create').addEventListener('click', () => act('creating…', async () => {
  saved = { userId: null, key: null, api: null, data: { progress: {} }, state: null }
  await connect(newUserId(), await generateKey(), $('api').value)
  return 'account created: sync to upload it'
}))

$('pair').addEventListener('click', () => act('pairing…', async () => {
  const { userId, key } = await readPairingCode($('pair-code').value)
  // Pairing again with the same account keeps this device's edits; they are merged.
  const local = saved.userId === userId ? saved.data : null
  saved = { ...saved, data: local }
  await connect(userId, key, $('api').value)
  saved.data = (await client.sync(local, mergeProgress)) ?? { progress: {} }
  persist()
  render()
  return 'paired and downloaded'
}))

$('save').addEventListener('click', () => {
  if (saved.data === null) return status('error', 'create an account or pair first')
  const subject = $('subject').value.trim()
  if (subject === '') return status('error', 'a subject needs a name')
  saved.data = { progress: { ...saved.data.progress, [subject]: { stars: stars($('stars').value), changedAt: Date.now() } } }
  persist()
  render()
  status('idle', 'changed on this device: not synced yet')
})

$('sync').addEventListener('click', () => act('syncing…', async () => {
  if (client === null) throw new Error('create an account or pair first')
  const sent = saved.data
  const synced = await client.sync(sent, mergeProgress)
  // Edits saved while the sync was on its way are kept, for the next sync.
  const newer = saved.data !== sent
  saved.data = newer ? mergeProgress(saved.data, synced) : synced
  persist()
  render()
  return newer ? 'synced; newer edits wait for the next sync' : `synced (${client.state.etag})`
}))

$('list').addEventListener('click', () => act('listing…', async () => {
  if (client === null) throw new Error('create an account or pair first')
  const versions = await client.versions()
  $('versions').replaceChildren(...versions.map((entry) => {
    const item = document.createElement('li')
    item.dataset.version = String(entry.version)
    item.append(`${new Date(entry.storedAt).toLocaleString()}, ${entry.size} bytes ${entry.current ? '(current) ' : ''}`)
    if (!entry.current) {
      const restore = document.createElement('button')
      restore.textContent = 'Restore'
      restore.addEventListener('click', () => act('restoring…', async () => {
        saved.data = await client.restore(entry.version)
        persist()
        render()
        return `restored the version of ${new Date(entry.storedAt).toLocaleTimeString()}`
      }))
      item.append(restore)
    }
    return item
  }))
  return `${versions.length} versions`
}))

// The service's address comes with the page (config.json), never from the URL: a link must
// not be able to send this device's token elsewhere. A saved account keeps its own service.
fetch('config.json').then((response) => response.json()).then(async ({ api }) => {
  $('api').value = saved.api ?? api
  if (saved.userId !== null && saved.key !== null && saved.api !== null) {
    await connect(saved.userId, await importKey(saved.key), saved.api)
  }
}).catch((err) => status('error', err.message))
render()
