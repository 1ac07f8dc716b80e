import { closeSync, mkdirSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs'
import { join, resolve } from 'node:path'
import type { PGlite } from '@electric-sql/pglite'

/**
 * The development database: PostgreSQL compiled to WebAssembly (PGlite), in this process,
 * served on a loopback port by pglite-socket so that the very same pg pool, SQL and migrations
 * run unchanged. No server to install, no OS user, no child process to orphan.
 */
export interface EmbeddedDatabase {
  /** Connection string of the loopback socket. */
  url: string
  /** Absolute data directory, or 'memory'. */
  dataDir: string
  close (): Promise<void>
}

const LOCK_FILE = 'logikids-sync.lock'

/**
 * Opens (creating on first use) the database in `dataDir` ('memory://' for a throwaway one) and
 * serves it on 127.0.0.1 with room for `maxConnections` pooled connections. Refuses a data
 * directory that another live process has open: PGlite itself would let two corrupt it.
 */
export async function startEmbeddedDatabase (dataDir: string, maxConnections: number): Promise<EmbeddedDatabase> {
  const inMemory = dataDir === 'memory://'
  const directory = inMemory ? 'memory' : resolve(dataDir)
  const releaseLock = inMemory ? () => {} : takeLock(directory)
  let db: PGlite | undefined
  try {
    // Loaded only here: a service with DATABASE_URL never pays for the WebAssembly build. They
    // are optional dependencies, left out of the production image (npm ci --omit=optional).
    const [{ PGlite }, { PGLiteSocketServer }] = await Promise.all([
      import('@electric-sql/pglite'), import('@electric-sql/pglite-socket')
    ]).catch((err: unknown) => {
      if ((err as { code?: string }).code !== 'ERR_MODULE_NOT_FOUND') throw err
      throw new Error('the embedded development database is not installed here (the production image leaves it out): ' +
        'set DATABASE_URL to a PostgreSQL server, or run npm install without --omit=optional', { cause: err })
    })
    db = inMemory ? new PGlite() : new PGlite(directory)
    await db.waitReady
    const server = new PGLiteSocketServer({ db, host: '127.0.0.1', port: 0, maxConnections })
    await server.start()
    const address = server.getServerConn()
    const port = Number(address.split(':').at(-1))
    let closed = false
    return {
      url: `postgres://postgres@127.0.0.1:${port}/postgres`,
      dataDir: directory,
      async close () {
        if (closed) return
        closed = true
        await server.stop()
        await db!.close()
        releaseLock()
      }
    }
  } catch (err) {
    await db?.close().catch(() => {})
    releaseLock()
    throw err
  }
}

function takeLock (directory: string): () => void {
  mkdirSync(directory, { recursive: true })
  const path = join(directory, LOCK_FILE)
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(path, 'wx')
      writeSync(fd, String(process.pid))
      closeSync(fd)
      return () => rmSync(path, { force: true })
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
      const holder = Number(readFileSync(path, 'utf8'))
      if (Number.isInteger(holder) && holder > 0 && holder !== process.pid && isAlive(holder)) {
        throw new Error(`the embedded database in ${directory} is in use by process ${holder}: stop that process, ` +
          `or set EMBEDDED_DATA_DIR to another folder (if no such process uses it, delete ${path})`)
      }
      // The holder died without cleaning up (kill -9, a crash): the lock is stale.
      rmSync(path, { force: true })
    }
  }
  throw new Error(`cannot lock ${path}`)
}

/** Whether a process with this id runs (EPERM: it does, as another user). */
export function isAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}
