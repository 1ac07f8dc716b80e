import t from 'tap'
import { execFile } from 'node:child_process'
import { readFileSync, rmSync, writeFileSync } from 'node:fs'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { build } from '../../test/helper.ts'

// client/README.md's quick start, run as a developer would run it (with the package's sources
// instead of the installed package), against the whole service in its default configuration.
// Every `console.log(x) // <printed>` line must print what its comment says.

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const readme = readFileSync(join(ROOT, 'client/README.md'), 'utf8')
const quickStart = readme.slice(readme.indexOf('## Quick start'))
const block = /```js\n([\s\S]*?)```/.exec(quickStart)?.[1]
if (block === undefined) throw new Error('client/README.md has no js block under "## Quick start"')

t.test('the quick start runs against a real service and prints what its comments say', async (t) => {
  const app = await build(t)
  await app.listen({ host: '127.0.0.1', port: 0 })
  const baseUrl = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
  t.match(block, /from '@logikids\/sync-client'/)
  t.match(block, /const baseUrl = 'http:\/\/localhost:3000'/)
  const script = block
    .replace("'@logikids/sync-client'", `'${pathToFileURL(join(ROOT, 'client/src/index.ts')).href}'`)
    .replace("'http://localhost:3000'", `'${baseUrl}'`)
  const file = join(tmpdir(), `quick-start-${process.pid}.mts`)
  writeFileSync(file, script)
  t.teardown(() => rmSync(file, { force: true }))
  const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', file], { cwd: ROOT })
  const expected = [...block.matchAll(/^console\.log\(.*\) \/\/ (.*)$/gm)].map((match) => match[1])
  t.equal(expected.length, 2)
  t.strictSame(stdout.trim().split('\n'), expected)
})
