import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { sparePort } from './pg-cluster.ts'

const MONITORING = join(import.meta.dirname, '..', 'deploy', 'monitoring')

/** Debian's Prometheus (installed by .ci/run), or null where it is not installed. */
export function prometheusBinary (): string | null {
  return ['/usr/bin/prometheus', '/usr/sbin/prometheus'].find((path) => existsSync(path)) ?? null
}

export interface Prometheus {
  /** An instant query through the HTTP API: the result vector (empty when the expression has no data). */
  query (expr: string): Promise<Array<{ metric: Record<string, string>, value: [number, string] }>>
  /** The alert rules as Prometheus evaluates them: name, expression and state (inactive, pending, firing). */
  alertRules (): Promise<Array<{ name: string, query: string, state: string }>>
  /** The scrape targets and their health, for a failing test to show. */
  targets (): Promise<unknown>
  stop (): Promise<void>
}

/**
 * A private Prometheus on a spare loopback port, configured by deploy/monitoring/prometheus-config.sh
 * as the compose profile configures it (its alert rules included), scraping `targets` every
 * second. Never the machine's own Prometheus service, which .ci/run's install leaves stopped.
 */
export async function startPrometheus (targets: string[]): Promise<Prometheus> {
  const binary = prometheusBinary()
  if (binary === null) throw new Error('no prometheus binary: apt-get install prometheus (.ci/run does)')
  const dir = mkdtempSync(join(tmpdir(), 'lk-prometheus-'))
  const config = execFileSync('sh', [join(MONITORING, 'prometheus-config.sh')], {
    env: { PATH: process.env.PATH, METRICS_TARGETS: targets.join(','), SCRAPE_INTERVAL: '1s', RULES_FILE: join(MONITORING, 'alerts.yml') }
  })
  writeFileSync(join(dir, 'prometheus.yml'), config)
  const port = await sparePort()
  const child: ChildProcess = spawn(binary, [`--config.file=${join(dir, 'prometheus.yml')}`, `--storage.tsdb.path=${join(dir, 'data')}`,
    `--web.listen-address=127.0.0.1:${port}`, '--log.level=warn'], { stdio: ['ignore', 'ignore', 'pipe'] })
  let output = ''
  child.stderr!.on('data', (chunk) => { output += String(chunk) })
  const exited = () => child.exitCode !== null || child.signalCode !== null
  // A test file that fails before its teardown runs must not leave Prometheus behind.
  const orphaned = () => { if (!exited()) child.kill('SIGKILL') }
  process.once('exit', orphaned)
  const base = `http://127.0.0.1:${port}`

  async function api<T> (path: string): Promise<T> {
    const res = await fetch(base + path)
    const body = await res.json() as { status: string, data: T, error?: string }
    if (body.status !== 'success') throw new Error(`Prometheus ${path}: ${body.error ?? res.status}`)
    return body.data
  }

  for (let i = 0; ; i++) {
    if (exited()) throw new Error(`prometheus exited: ${output}`)
    if (await fetch(`${base}/-/ready`).then((res) => res.ok, () => false)) break
    if (i === 300) throw new Error(`prometheus did not become ready: ${output}`)
    await sleep(100)
  }

  return {
    async query (expr) {
      const data = await api<{ resultType: string, result: Array<{ metric: Record<string, string>, value: [number, string] }> }>(
        `/api/v1/query?query=${encodeURIComponent(expr)}`)
      return data.result
    },
    async alertRules () {
      const data = await api<{ groups: Array<{ rules: Array<{ type: string, name: string, query: string, state: string }> }> }>('/api/v1/rules?type=alert')
      return data.groups.flatMap((group) => group.rules.map(({ name, query, state }) => ({ name, query, state })))
    },
    async targets () {
      return await api<unknown>('/api/v1/targets')
    },
    async stop () {
      process.removeListener('exit', orphaned)
      if (!exited()) {
        const done = new Promise((resolve) => child.once('exit', resolve))
        child.kill('SIGTERM')
        await done
      }
      rmSync(dir, { recursive: true, force: true })
    }
  }
}
