import net from 'node:net'

/**
 * A TCP proxy in front of PostgreSQL that a test can cut and restore, so that faults are
 * real socket failures without touching the shared server.
 */
export interface Proxy {
  port: number
  /** Refuses new connections and destroys the open ones: the database is gone. */
  cut (): Promise<void>
  /** Accepts connections again on the same port. */
  restore (): Promise<void>
  close (): Promise<void>
}

export async function startProxy (target: { host: string, port: number }): Promise<Proxy> {
  const sockets = new Set<net.Socket>()
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host)
    for (const socket of [client, upstream]) {
      sockets.add(socket)
      socket.on('close', () => sockets.delete(socket))
      socket.on('error', () => {})
    }
    client.pipe(upstream).pipe(client)
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
  return { port, cut: stop, restore: () => listen(port), close: stop }
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
