// npm run migrate-blobs [-- --batch N]
// Converts the versions stored as base64 text before sql/006_ciphertext_bytes.sql to bytes, a
// third less disk, in short batches (N versions, and at most 8 MB of text) while the service runs (uploads and downloads go on; each
// version is read the same before and after). Safe to stop and run again: it resumes with what is
// left. Prints how many it converted, and how many it left as text (see plugins/storage.ts).
// Reads DATABASE_URL. Exit status: 0 done, 1 failed, 64 bad arguments, 78 bad environment.
import { parseArgs } from 'node:util'
import { startCommand } from './command.ts'
import { safeError } from '../logging.ts'
import { progress, type Progress } from './progress.ts'

const usage = 'usage: npm run migrate-blobs [-- --batch N]   (N versions per statement, 1 to 10000; default 100)'
let batch: number
try {
  const { values } = parseArgs({ options: { batch: { type: 'string', default: '100' } } })
  batch = /^[0-9]+$/.test(values.batch ?? '') ? Number(values.batch) : NaN
  if (!(batch >= 1 && batch <= 10_000)) throw new Error('--batch must be a whole number from 1 to 10000')
} catch (err) {
  console.error(`migrate-blobs: ${(err as Error).message}\n${usage}`)
  process.exit(64)
}

const { pool, storage } = startCommand('migrate-blobs')
let shown: Progress | undefined
try {
  const started = Date.now()
  const total = await storage.countTextBlobs()
  shown = progress('migrate-blobs', 'versions', total)
  const { converted, keptAsText } = await storage.convertTextBlobs(batch, (rows) => shown?.advance(rows))
  shown.end()
  const kept = keptAsText === 0
    ? ''
    : `; ${keptAsText} still stored as text: not canonical base64, so bytes could not give the same text back (docs/operations.md says what to do)`
  console.log(`migrate-blobs: converted ${converted} of ${total} versions stored as base64 text to bytes in ${Date.now() - started} ms${kept}`)
} catch (err) {
  shown?.end()
  console.error(`migrate-blobs: failed: ${safeError(err).message} (what was converted stays converted; run it again to go on)`)
  process.exitCode = 1
} finally {
  await pool.end()
}
