// The resolve hook of loaded-modules.mjs (it runs on the loader's own thread).
import { appendFileSync } from 'node:fs'

let options = { log: undefined, match: undefined }

export function initialize (data) {
  options = data
}

export async function resolve (specifier, context, next) {
  const resolved = await next(specifier, context)
  if (options.log !== undefined && options.match !== undefined && resolved.url.includes(options.match)) {
    appendFileSync(options.log, resolved.url + '\n')
  }
  return resolved
}
