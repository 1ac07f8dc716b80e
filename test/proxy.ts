import net from 'node:net'

/**
 * A TCP proxy in front of PostgreSQL that a test can slow down, stall, reset or cut, so that
 * network faults are real socket behaviour without touching the shared server. (The kernel
 * here has no netem, and toxiproxy is not packaged.)
 */
export interface Proxy {
  port: number
  /** Delays every chunk, both ways, by this many milliseconds (0: none). */
  setLatency (ms: number): void
  /** Stops forwarding bytes, both ways, but keeps every connection open: a hung network. */
  stall (): void
  /** Forwards again, including what was held back while stalled. */
  resume (): void
  /**
   * The connections open now lose every byte from here on, both ways, but stay open (a
   * silent network drop: a failover, a firewall that forgot them); new connections work.
   */
  blackhole (): void
  /** Resets every open connection (TCP RST), as a crashed middlebox would. */
  reset (): void
  /** Refuses new connections and destroys the open ones: the database is gone. */
  cut (): Promise<void>
  /** Accepts connections again on the same port. */
  restore (): Promise<void>
  close (): Promise<void>
}

export async function startProxy (target: { host: string, port: number }): Promise<Proxy> {
  const sockets = new Set<net.Socket>()
  let latencyMs = 0
  let stalled = false
  const held: Array<() => void> = []
  const lost = new WeakSet<net.Socket>()

  function forward (from: net.Socket, to: net.Socket): void {
    from.on('data', (chunk) => {
      if (lost.has(from)) return
      const send = () => { if (!to.destroyed) to.write(chunk) }
      const deliver = () => (stalled ? held.push(send) : send())
      if (latencyMs > 0) setTimeout(deliver, latencyMs)
      else deliver()
    })
  }

  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host)
    for (const socket of [client, upstream]) {
      sockets.add(socket)
      socket.on('close', () => sockets.delete(socket))
      socket.on('error', () => {})
    }
    forward(client, upstream)
    forward(upstream, client)
    client.on('close', () => upstream.destroy())
    upstream.on('close', () => client.destroy())
  })
  const listen = (port: number) => new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject)
      resolve()
    })
  })
  const stop = () => new Promise<void>((resolve) => {
    for (const socket of sockets) socket.destroy()
    if (server.listening) server.close(() => resolve())
    else resolve()
  })
  await listen(0)
  const port = (server.address() as net.AddressInfo).port
  return {
    port,
    setLatency: (ms) => { latencyMs = ms },
    stall: () => { stalled = true },
    resume: () => {
      stalled = false
      for (const send of held.splice(0)) send()
    },
    blackhole: () => { for (const socket of sockets) lost.add(socket) },
    reset: () => { for (const socket of sockets) socket.resetAndDestroy() },
    cut: stop,
    restore: () => listen(port),
    close: stop
  }
}

/** The same connection string, reaching its server through the proxy. */
export function throughProxy (connectionString: string, proxy: Proxy): string {
  const url = new URL(connectionString)
  url.hostname = '127.0.0.1'
  url.port = String(proxy.port)
  return url.toString()
}

export function targetOf (connectionString: string): { host: string, port: number } {
  const url = new URL(connectionString)
  return { host: url.hostname || '127.0.0.1', port: Number(url.port || 5432) }
}
