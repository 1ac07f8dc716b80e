import t from 'tap'
import { execFile, spawn } from 'node:child_process'
import { once } from 'node:events'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { createTestDatabase, type TestContext } from '../helper.ts'

// docs/sync-protocol.md's curl walk-through, run as written against the real server: every line
// it prints must be the one the document shows after it (`# ...`), in order.
const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const run = promisify(execFile)
const SECTION = '## A worked example with curl'

/** The ```sh blocks of the walk-through section, and the output lines they promise. */
function walkthrough (markdown: string): { script: string, expected: string[] } {
  const start = markdown.indexOf(SECTION)
  if (start === -1) throw new Error(`docs/sync-protocol.md has no "${SECTION}" section`)
  const next = markdown.indexOf('\n## ', start + SECTION.length)
  const section = markdown.slice(start, next === -1 ? undefined : next)
  const blocks = [...section.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].map((match) => match[1]!)
  const expected = blocks.flatMap((block) => block.split('\n'))
    .filter((line) => line.startsWith('# '))
    .map((line) => line.slice(2))
  return { script: blocks.join('\n'), expected }
}

/** Whether a printed line is the one the document shows; `…` in the document stands for anything. */
function matches (printed: string, shown: string): boolean {
  const pattern = shown.split('…').map((part) => part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('.*')
  return new RegExp(`^${pattern}$`).test(printed)
}

/** `node --import tsx server.ts` on a port of its own; stopped (SIGTERM) by stop() or at teardown. */
async function startServer (t: TestContext, databaseUrl: string): Promise<{ url: string, stop: () => Promise<void> }> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'server.ts'], {
    cwd: ROOT,
    // LOG_LEVEL=info: the "Server listening at" line that names the port is an info line.
    env: { PATH: process.env.PATH ?? '', DATABASE_URL: databaseUrl, PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', CLEANUP_INTERVAL: '0' },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const exited = once(child, 'exit')
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM')
      await exited
    }
  }
  t.teardown(stop)
  let output = ''
  const url = await new Promise<string>((resolve, reject) => {
    const read = (chunk: Buffer) => {
      output += chunk.toString()
      const match = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(output)
      if (match) resolve(match[1]!)
    }
    child.stdout!.on('data', read)
    child.stderr!.on('data', read)
    exited.then(([code]) => reject(new Error(`the server exited with ${String(code)} before listening:\n${output}`)))
  })
  return { url, stop }
}

const { script, expected } = walkthrough(readFileSync(new URL('../../docs/sync-protocol.md', import.meta.url), 'utf8'))

t.test('the walk-through promises the protocol\'s answers', async (t) => {
  const statuses = expected.filter((line) => line.startsWith('HTTP/')).map((line) => line.split(' ')[1])
  t.ok(statuses.length >= 8, `${statuses.length} steps show a status`)
  for (const status of ['200', '304', '404', '412']) t.ok(statuses.includes(status), `a step answers ${status}`)
  t.notMatch(script, /If-(None-)?Match: "/, 'no step types an ETag: each one comes from a variable')
  t.match(script, /\$BASE/, 'the service address is $BASE')
})

t.test('run as written against the real server, it prints exactly what the document shows', async (t) => {
  await run('curl', ['--version']).catch(() => { throw new Error('the walk-through needs curl on the PATH') })
  const server = await startServer(t, await createTestDatabase(t))
  const { stdout } = await run('bash', ['-c', `set -euo pipefail\n${script}`], {
    cwd: ROOT, env: { PATH: process.env.PATH ?? '', BASE: server.url }, timeout: 120_000
  }).finally(server.stop)
  const printed = stdout.split('\n').filter((line) => line !== '')
  t.equal(printed.length, expected.length, `${printed.length} lines printed, ${expected.length} shown in the document`)
  for (const [i, shown] of expected.entries()) {
    t.ok(matches(printed[i] ?? '(nothing)', shown), `line ${i + 1}: ${shown}`, { printed: printed[i], shown })
  }
})
