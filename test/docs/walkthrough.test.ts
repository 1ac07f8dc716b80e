import t from 'tap'
import { execFile } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { createTestDatabase } from '../helper.ts'
import { startServer } from '../server-process.ts'

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
  const server = await startServer(t, { env: { DATABASE_URL: await createTestDatabase(t), CLEANUP_INTERVAL: '0' } })
  const { stdout } = await run('bash', ['-c', `set -euo pipefail\n${script}`], {
    cwd: ROOT, env: { PATH: process.env.PATH ?? '', BASE: server.url }, timeout: 120_000
  }).finally(() => server.stop())
  const printed = stdout.split('\n').filter((line) => line !== '')
  t.equal(printed.length, expected.length, `${printed.length} lines printed, ${expected.length} shown in the document`)
  for (const [i, shown] of expected.entries()) {
    t.ok(matches(printed[i] ?? '(nothing)', shown), `line ${i + 1}: ${shown}`, { printed: printed[i], shown })
  }
})
