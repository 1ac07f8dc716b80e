#!/usr/bin/env bash
# Checks what can be checked of the deployment without a container runtime: the compose files
# resolve, production publishes no database port and demands a password, the Dockerfile passes
# a linter, the monitoring profile's rules and Prometheus configuration pass promtool, and the
# shell scripts pass shellcheck. CI runs it; it needs npx and the Debian packages
# docker-compose, python3-yaml, shellcheck and prometheus.
set -euo pipefail
cd "$(dirname "$0")/.."

fail () { echo "check-deploy: $*" >&2; exit 1; }

# Compose files resolve, in both the development and the production combination.
docker-compose -f docker-compose.yml config -q
docker-compose config -q
POSTGRES_PASSWORD=check-only-password docker-compose -f docker-compose.yml -f docker-compose.prod.yml config -q
if docker-compose -f docker-compose.yml -f docker-compose.prod.yml config -q 2>/dev/null </dev/null; then
  # Only when no .env supplies one: then production must refuse to start without a password.
  [ -f .env ] || fail "production compose accepted an empty POSTGRES_PASSWORD"
fi

# What each combination publishes: development keeps PostgreSQL on loopback; production publishes none.
ports_of () { python3 -c '
import sys, yaml
services = yaml.safe_load(sys.stdin)["services"]
for port in services[sys.argv[1]].get("ports", []):
    print(port if isinstance(port, str) else "%s:%s:%s" % (port.get("host_ip", ""), port["published"], port["target"]))
' "$1"; }
dev_db_ports=$(docker-compose config | ports_of postgres)
[ "$dev_db_ports" = "127.0.0.1:5432:5432/tcp" ] || fail "development should publish PostgreSQL on 127.0.0.1:5432 only, got: $dev_db_ports"
prod_db_ports=$(POSTGRES_PASSWORD=x docker-compose -f docker-compose.yml -f docker-compose.prod.yml config | ports_of postgres)
[ -z "$prod_db_ports" ] || fail "production must publish no database port, got: $prod_db_ports"
# Captured first: grep -q stops reading at the match, and under pipefail the writer's SIGPIPE
# would fail the check at random.
prod_config=$(POSTGRES_PASSWORD=x docker-compose -f docker-compose.yml -f docker-compose.prod.yml config)
grep -q 'NODE_ENV: production' <<<"$prod_config" || fail "production compose must set NODE_ENV=production"

# The scale-out file (docs/scaling.md): resolves with its two passwords and refuses to without;
# three instances, each with the shared Redis, the replica for reads and the proxy as the only
# trusted one; only the proxy publishes a port; nginx sends to exactly those instances; every
# variable an instance gets is one docker-compose.yml passes (test/docs/settings.test.ts ties
# those to the settings the service reads).
scale_env=(POSTGRES_PASSWORD=check-only-password REPLICATION_PASSWORD=check-only-replication)
scale_config=$(env "${scale_env[@]}" docker-compose -f docker-compose.scale.yml config)
if docker-compose -f docker-compose.scale.yml config -q 2>/dev/null </dev/null; then
  [ -f .env ] || fail "docker-compose.scale.yml accepted empty passwords"
fi
base_config=$(docker-compose -f docker-compose.yml config)
problems=$(python3 -c '
import re, sys, yaml
scale = yaml.safe_load(sys.argv[1])["services"]
base = yaml.safe_load(sys.argv[2])["services"]["sync"]["environment"]
upstream = re.findall(r"^\s*server\s+([a-z0-9-]+):3000", open("deploy/scale/nginx.conf").read(), re.M)
instances = sorted(name for name in scale if name.startswith("sync-"))
problems = []
if instances != ["sync-1", "sync-2", "sync-3"]: problems.append("instances: %s" % instances)
if sorted(upstream) != instances: problems.append("nginx upstream %s is not the instances %s" % (upstream, instances))
proxy_ip = scale["proxy"]["networks"]["scale"]["ipv4_address"]
for name in instances:
    env = scale[name]["environment"]
    if env.get("REDIS_URL") != "redis://redis:6379": problems.append(name + ": REDIS_URL is not the shared Redis")
    if "@postgres-replica:5432/" not in env.get("DATABASE_READ_URL", ""): problems.append(name + ": DATABASE_READ_URL is not the replica")
    if "@postgres:5432/" not in env.get("DATABASE_URL", ""): problems.append(name + ": DATABASE_URL is not the primary")
    if env.get("TRUST_PROXY") != proxy_ip: problems.append(name + ": TRUST_PROXY is not the proxy (%s)" % proxy_ip)
    if env.get("NODE_ENV") != "production": problems.append(name + ": NODE_ENV is not production")
    unknown = sorted(set(env) - set(base))
    if unknown: problems.append(name + ": variables docker-compose.yml does not pass: %s" % unknown)
    if scale[name].get("ports"): problems.append(name + " publishes a port")
published = sorted(name for name, service in scale.items() if service.get("ports"))
if published != ["proxy"]: problems.append("only the proxy may publish a port, not %s" % published)
if "--save" not in scale["redis"].get("command", []): problems.append("redis keeps counters on disk")
print("\n".join(problems))
' "$scale_config" "$base_config")
[ -z "$problems" ] || fail "docker-compose.scale.yml: $problems"

# The monitoring profile (docs/operations.md, "Monitoring"): resolves in development and
# production; Grafana is published on loopback only and Prometheus not at all; the alert rules
# and the Prometheus configuration prometheus-config.sh writes, for each way the service serves
# its metrics, pass promtool (Debian's prometheus package). test/app/monitoring.test.ts runs
# them against a real Prometheus.
docker-compose --profile monitoring config -q
monitoring_config=$(POSTGRES_PASSWORD=x docker-compose -f docker-compose.yml -f docker-compose.prod.yml --profile monitoring config)
grafana_ports=$(ports_of grafana <<<"$monitoring_config")
[[ "$grafana_ports" =~ ^127\.0\.0\.1:[0-9]+:3000/tcp$ ]] || fail "Grafana should be published on 127.0.0.1 only, got: $grafana_ports"
[ -z "$(ports_of prometheus <<<"$monitoring_config")" ] || fail "Prometheus must publish no port"
promtool check rules deploy/monitoring/alerts.yml >/dev/null
monitoring_tmp=$(mktemp -d)
trap 'rm -rf "$monitoring_tmp"' EXIT
for settings in "NODE_ENV=production" "NODE_ENV=production METRICS_TOKEN=check-only-token" "NODE_ENV=development"; do
  # shellcheck disable=SC2086 # one word per setting
  env $settings RULES_FILE="$PWD/deploy/monitoring/alerts.yml" TOKEN_FILE="$monitoring_tmp/token" \
    sh deploy/monitoring/prometheus-config.sh > "$monitoring_tmp/prometheus.yml"
  promtool check config "$monitoring_tmp/prometheus.yml" >/dev/null || fail "prometheus-config.sh with $settings: promtool refuses it"
done
# With the environment each combination really gives the two containers (.env included):
# Prometheus scrapes where the service serves its metrics, the listener in production without
# METRICS_TOKEN, else the service port.
environment_of () { python3 -c '
import sys, yaml
env = yaml.safe_load(sys.stdin)["services"][sys.argv[1]].get("environment", {})
for name, value in (env.items() if isinstance(env, dict) else (entry.split("=", 1) for entry in env)):
    print("%s=%s" % (name, "" if value is None else value))
' "$1"; }
setting () { grep -m1 "^$1=" | cut -d= -f2-; }
check_scrape_target () {
  local config=$1 combination=$2 sync_env prometheus_env expected actual
  sync_env=$(environment_of sync <<<"$config")
  prometheus_env=$(environment_of prometheus <<<"$config")
  if [ "$(setting NODE_ENV <<<"$sync_env")" = production ] && [ -z "$(setting METRICS_TOKEN <<<"$sync_env")" ]; then
    local port host
    port=$(setting METRICS_PORT <<<"$sync_env")
    host=$(setting METRICS_HOST <<<"$sync_env")
    # The listener must be reachable from the Prometheus container, on a port it can name.
    if ! [[ "$port" =~ ^[1-9][0-9]{0,4}$ ]] || [ "$port" -gt 65535 ]; then
      fail "$combination: METRICS_PORT must be a port number from 1 to 65535, got: $port"
    fi
    if [[ "$host" =~ ^(127\.|::1$|localhost$) ]]; then
      fail "$combination: METRICS_HOST $host is the container's own loopback: Prometheus cannot reach the metrics there"
    fi
    expected="\"sync:$port\""
  else
    expected='"sync:3000"'
  fi
  local settings
  mapfile -t settings <<<"$prometheus_env"
  # The token file goes to this check's own folder, never to the container's path on this host.
  actual=$(env -i PATH="$PATH" "${settings[@]}" TOKEN_FILE="$monitoring_tmp/token" sh deploy/monitoring/prometheus-config.sh | grep -o '"sync:[^"]*"' || true)
  [ "$actual" = "$expected" ] || fail "$combination: Prometheus would scrape $actual, the service serves its metrics at $expected"
}
check_scrape_target "$monitoring_config" production
check_scrape_target "$(docker-compose --profile monitoring config)" development
rm -rf "$monitoring_tmp"
trap - EXIT

# The Dockerfile linter (its findings go to stdout; it exits 0 either way). It would download
# its own copy of shellcheck; -s none and no install scripts skip that (Debian's runs below).
lint=$(npm_config_ignore_scripts=true npx --yes -p dockerlinter@1.2.2 dockerlinter -f Dockerfile -s none)
[ -z "$lint" ] || fail "Dockerfile lint findings:
$lint"

shellcheck scripts/*.sh deploy/scale/*.sh deploy/monitoring/*.sh .ci/run

# The runtime image's contents without an engine: the production install the Dockerfile makes
# (no dev, no optional dependencies: no PGlite), the compiled service and sql/, started as the
# image starts it. With DATABASE_URL it must serve; without it, say the embedded database is
# not installed, and exit 1.
if [ -n "${DATABASE_URL:-}" ]; then
  image=$(mktemp -d)
  # A database of its own on that server, dropped afterwards.
  check_db="lk_check_deploy_$$"
  check_url=$(node -e 'const url = new URL(process.argv[1]); url.pathname = "/" + process.argv[2]; console.log(url.toString())' "$DATABASE_URL" "$check_db")
  psql -q -d "$DATABASE_URL" -c "CREATE DATABASE $check_db"
  trap 'rm -rf "$image"; psql -q -d "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $check_db WITH (FORCE)"' EXIT
  npm run --silent build
  cp package.json package-lock.json "$image/"
  cp -r dist sql "$image/"
  (cd "$image" && npm ci --omit=dev --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
  [ ! -e "$image/node_modules/@electric-sql/pglite" ] || fail "the production install contains PGlite"
  if out=$(cd "$image" && env -i PATH="$PATH" PORT=0 node dist/server.js 2>&1); then
    fail "without DATABASE_URL the production install should exit 1, it exited 0"
  fi
  grep -q 'embedded development database is not installed here' <<<"$out" \
    || fail "without DATABASE_URL the production install should say the embedded database is missing, got: $out"
  log="$image/server.log"
  (cd "$image" && exec env -i PATH="$PATH" PORT=0 HOST=127.0.0.1 DATABASE_URL="$check_url" CLEANUP_INTERVAL=0 \
    node dist/server.js >"$log" 2>&1) &
  pid=$!
  url=""
  for _ in $(seq 1 100); do
    url=$(grep -o 'Server listening at http://127.0.0.1:[0-9]*' "$log" | head -1 | sed 's/Server listening at //' || true)
    [ -n "$url" ] && break
    sleep 0.2
  done
  [ -n "$url" ] || { kill "$pid" 2>/dev/null; fail "the production install did not start: $(cat "$log")"; }
  health=$(node -e "fetch(process.argv[1] + '/health').then(async (r) => console.log(r.status, await r.text()))" "$url")
  kill -TERM "$pid"
  wait "$pid" || fail "the production install did not exit 0 on SIGTERM"
  [[ "$health" == 200* ]] || fail "the production install's /health: $health"
fi

echo "check-deploy: compose files, Dockerfile, scripts and the production install are fine"
