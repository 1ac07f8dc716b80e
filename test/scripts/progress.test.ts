import t from 'tap'
import { Writable } from 'node:stream'
import { describeProgress, progress } from '../../scripts/progress.ts'

/** A stream that keeps what is written to it, a terminal or not. */
function output (isTTY: boolean) {
  const chunks: string[] = []
  const stream = Object.assign(new Writable({ write (chunk, _encoding, done) { chunks.push(String(chunk)); done() } }), { isTTY })
  return { stream, chunks }
}

t.test('a line says rows done, of how many, the rate and the time left', async (t) => {
  t.equal(describeProgress('migrate-blobs', 'versions', 1200, 5000, 4000), 'migrate-blobs: 1,200 of 5,000 versions (24%), 300 versions/s, about 13 s left')
  t.equal(describeProgress('migrate-blobs', 'versions', 5000, 5000, 10_000), 'migrate-blobs: 5,000 of 5,000 versions (100%), 500 versions/s', 'nothing left to wait for at the end')
  t.equal(describeProgress('x', 'rows', 100, 1_000_000, 1000), 'x: 100 of 1,000,000 rows (0%), 100 rows/s, about 2.8 h left')
  t.equal(describeProgress('x', 'rows', 600, 6000, 1000), 'x: 600 of 6,000 rows (10%), 600 rows/s, about 9 s left')
  t.equal(describeProgress('x', 'rows', 600, 60_000, 1000), 'x: 600 of 60,000 rows (1%), 600 rows/s, about 2 min left')
  t.equal(describeProgress('cleanup: dropping versions past the history limits', 'versions', 1500, null, 3000),
    'cleanup: dropping versions past the history limits: 1,500 versions, 500 versions/s', 'no total: no share and no time left')
})

t.test('on a terminal the line is redrawn in place as batches end, at most five times a second, and finished at the end', async (t) => {
  let now = 0
  const { stream, chunks } = output(true)
  const shown = progress('migrate-blobs', 'versions', 1000, stream, () => now)
  for (let batch = 1; batch <= 10; batch++) {
    now += 100
    shown.advance(100)
  }
  shown.end()
  t.equal(chunks.length, 6, 'five redraws in one second of ten batches, and the last line')
  t.ok(chunks.every((chunk) => chunk.startsWith('\r\x1b[2K')), 'each one over the line before')
  t.equal(chunks[0], '\r\x1b[2Kmigrate-blobs: 200 of 1,000 versions (20%), 1,000 versions/s, about 1 s left')
  t.equal(chunks.at(-1), '\r\x1b[2Kmigrate-blobs: 1,000 of 1,000 versions (100%), 1,000 versions/s\n')
})

t.test('elsewhere (a log, a pipe) it stays quiet: a line every 30 s at most, none at the end', async (t) => {
  let now = 0
  const { stream, chunks } = output(false)
  const shown = progress('cleanup: deleting inactive accounts', 'accounts', null, stream, () => now)
  for (let batch = 1; batch <= 100; batch++) {
    now += 1000
    shown.advance(1000)
  }
  shown.end()
  t.strictSame(chunks, [
    'cleanup: deleting inactive accounts: 30,000 accounts, 1,000 accounts/s\n',
    'cleanup: deleting inactive accounts: 60,000 accounts, 1,000 accounts/s\n',
    'cleanup: deleting inactive accounts: 90,000 accounts, 1,000 accounts/s\n'
  ], 'three lines in 100 s of 100 batches')
})
