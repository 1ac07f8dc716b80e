// node --import ./test/loaded-modules.mjs: appends to $LOADED_MODULES_LOG the URL of every
// module the process imports whose URL contains $LOADED_MODULES_MATCH, and at exit the files of
// every CommonJS module it required (which the import hook does not see), for tracing.test.ts:
// that with tracing off, nothing of OpenTelemetry is loaded.
import { appendFileSync } from 'node:fs'
import { createRequire, register } from 'node:module'

const { LOADED_MODULES_LOG: log, LOADED_MODULES_MATCH: match } = process.env
if (log !== undefined && match !== undefined) {
  const required = createRequire(import.meta.url).cache
  process.on('exit', () => {
    const files = Object.keys(required).filter((file) => file.includes(match))
    if (files.length > 0) appendFileSync(log, files.join('\n') + '\n')
  })
}

register(new URL('./loaded-modules-hooks.mjs', import.meta.url), {
  data: { log, match }
})
