// node --import ./test/loaded-modules.mjs: appends to $LOADED_MODULES_LOG the URL of every
// module the process imports whose URL contains $LOADED_MODULES_MATCH (tracing.test.ts: that
// with tracing off, nothing of OpenTelemetry is loaded).
import { register } from 'node:module'

register(new URL('./loaded-modules-hooks.mjs', import.meta.url), {
  data: { log: process.env.LOADED_MODULES_LOG, match: process.env.LOADED_MODULES_MATCH }
})
