// The progress of a long command (npm run migrate-blobs, npm run cleanup): rows done, rate and
// time left, redrawn in place on a terminal; where the output is a log or a pipe, a line now and
// then at most (one per batch at most, and never more than one every LOG_EVERY_MS).
import type { Writable } from 'node:stream'

const REDRAW_EVERY_MS = 200
const LOG_EVERY_MS = 30_000

export interface Progress {
  /** Counts `rows` more rows done (one batch). */
  advance (rows: number): void
  /** Ends the display: the terminal's line is finished; nothing more is written. */
  end (): void
}

const count = (n: number) => Math.round(n).toLocaleString('en-US')

function duration (seconds: number): string {
  if (seconds < 90) return `${Math.ceil(seconds)} s`
  if (seconds < 90 * 60) return `${Math.ceil(seconds / 60)} min`
  return `${(seconds / 3600).toFixed(1)} h`
}

/**
 * One line of progress: `label: 1,200 of 5,000 rows (24%), 300 rows/s, about 13 s left`, or
 * without a total (not known in advance) `label: 1,200 rows, 300 rows/s`.
 */
export function describeProgress (label: string, unit: string, done: number, total: number | null, elapsedMs: number): string {
  const rate = elapsedMs > 0 ? done / (elapsedMs / 1000) : 0
  const pace = `${count(rate)} ${unit}/s`
  if (total === null) return `${label}: ${count(done)} ${unit}, ${pace}`
  const percent = total > 0 ? Math.min(100, Math.floor((done / total) * 100)) : 100
  const left = rate > 0 && done < total ? `, about ${duration((total - done) / rate)} left` : ''
  return `${label}: ${count(done)} of ${count(total)} ${unit} (${percent}%), ${pace}${left}`
}

/** Reports to `out` (stderr by default), the way it suits what `out` is. */
export function progress (label: string, unit: string, total: number | null,
  out: Writable & { isTTY?: boolean } = process.stderr, now: () => number = Date.now): Progress {
  const started = now()
  const terminal = out.isTTY === true
  let done = 0
  let shownAt = started
  let shown = false
  let ended = false
  const line = () => describeProgress(label, unit, done, total, now() - started)
  return {
    advance (rows) {
      done += rows
      const at = now()
      if (at - shownAt < (terminal ? REDRAW_EVERY_MS : LOG_EVERY_MS)) return
      shownAt = at
      shown = true
      out.write(terminal ? `\r\x1b[2K${line()}` : `${line()}\n`)
    },
    end () {
      if (terminal && shown && !ended) out.write(`\r\x1b[2K${line()}\n`)
      ended = true
    }
  }
}
