import t from 'tap'
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const run = promisify(execFile)

// A port nothing listens on: should the script accept the environment after all, it fails to
// connect instead of cleaning up a real database.
const NOWHERE = 'postgres://postgres@127.0.0.1:1/nowhere'

async function cleanup (env: Record<string, string>, args = ['--days', '5']) {
  try {
    const { stdout, stderr } = await run(process.execPath, ['--import', 'tsx', 'scripts/cleanup.ts', ...args], {
      cwd: ROOT, env: { PATH: process.env.PATH ?? '', DATABASE_URL: NOWHERE, ...env }, timeout: 60_000
    })
    return { code: 0, stdout, stderr }
  } catch (err) {
    const failed = err as { code: number, stdout: string, stderr: string }
    return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr }
  }
}

t.test('npm run cleanup with a bad setting: exit 78 (EX_CONFIG) and one line naming it, no stack trace', async (t) => {
  for (const [name, env] of [
    ['LOG_LEVEL', { LOG_LEVEL: 'verbose' }],
    ['PORT', { PORT: 'abc' }],
    ['DATABASE_URL', { DATABASE_URL: '' }]
  ] as const) {
    const result = await cleanup(env)
    t.equal(result.code, 78, `${name}: exit code`)
    const lines = result.stderr.trimEnd().split('\n')
    t.equal(lines.length, 1, `${name}: one line on stderr:\n${result.stderr}`)
    const first = lines[0] ?? ''
    t.ok(first.startsWith('cleanup: invalid configuration:'), first)
    t.match(first, new RegExp(name))
    t.notOk(result.stderr.includes('    at '), `${name}: no stack trace`)
  }
})

t.test('npm run cleanup with bad arguments: exit 64 (EX_USAGE) with the usage, before any database is asked', async (t) => {
  for (const args of [[], ['--days', '0'], ['--days', '1.5'], ['--days', '1e2'], ['--days', '0x10'], ['--days', ' 7'], ['--nope']]) {
    const result = await cleanup({}, args)
    t.equal(result.code, 64, args.join(' ') || '(none)')
    t.match(result.stderr, /usage: npm run cleanup -- --days N/)
  }
})
