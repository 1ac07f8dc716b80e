import type { FastifyInstance } from 'fastify'
import { until } from './wait.ts'

/**
 * Runs `fn` while this process's event loop is saturated, as under a CPU-bound overload: busy
 * chunks of 100 ms with a turn of the loop between them, so requests still move, slowly. `fn`
 * starts once the app's load shedder has measured the overload, and the overload lasts until
 * `fn` is done: what `fn` sends is shed on every run, whatever the machine's speed. Afterwards
 * it waits until the shedder sees a calm loop again.
 */
export async function whileOverloaded<T> (app: FastifyInstance, fn: () => Promise<T>): Promise<T> {
  const limit = app.config.MAX_EVENT_LOOP_DELAY_MS
  await app.loadSheddingArmed
  const overload = { on: true }
  const burn = (async () => {
    while (overload.on) {
      const chunkEnds = Date.now() + 100
      while (Date.now() < chunkEnds) { /* busy */ }
      await new Promise((resolve) => setImmediate(resolve))
    }
  })()
  try {
    await until(() => app.memoryUsage().eventLoopDelay > limit, 'the load shedder measures the overload')
    return await fn()
  } finally {
    overload.on = false
    await burn
    await until(() => app.memoryUsage().eventLoopDelay <= limit, 'the event loop is calm again')
  }
}
