import { setTimeout as sleep } from 'node:timers/promises'

// Bounded waits for conditions and events: a test waits for what it needs, never for a fixed
// time, and never asserts how long anything took.

/** Polls `condition` every 10 ms until it holds (true) or `boundMs` have passed (false). */
export async function eventually (condition: () => boolean | Promise<boolean>, boundMs: number): Promise<boolean> {
  for (const deadline = Date.now() + boundMs; ;) {
    if (await condition()) return true
    if (Date.now() > deadline) return false
    await sleep(10)
  }
}

/** Polls `condition` until it holds; fails, naming `what`, after `boundMs`. */
export async function until (condition: () => boolean | Promise<boolean>, what: string, boundMs = 20_000): Promise<void> {
  if (!await eventually(condition, boundMs)) throw new Error(`gave up after ${boundMs} ms waiting until ${what}`)
}

/** Resolves with the promise's value, or with 'timeout' after `ms`. */
export function within<T> (ms: number, promise: Promise<T>): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([promise, new Promise<'timeout'>((resolve) => { timer = setTimeout(() => resolve('timeout'), ms) })])
    .finally(() => clearTimeout(timer))
}
