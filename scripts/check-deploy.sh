#!/usr/bin/env bash
# Checks what can be checked of the deployment without a container runtime: the compose files
# resolve, production publishes no database port and demands a password, the Dockerfile passes
# a linter, and the shell scripts pass shellcheck. CI runs it; it needs npx and the Debian
# packages docker-compose, python3-yaml and shellcheck.
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
POSTGRES_PASSWORD=x docker-compose -f docker-compose.yml -f docker-compose.prod.yml config | grep -q 'NODE_ENV: production' \
  || fail "production compose must set NODE_ENV=production"

# The Dockerfile linter (its findings go to stdout; it exits 0 either way). It would download
# its own copy of shellcheck; -s none and no install scripts skip that (Debian's runs below).
lint=$(npm_config_ignore_scripts=true npx --yes -p dockerlinter@1.2.2 dockerlinter -f Dockerfile -s none)
[ -z "$lint" ] || fail "Dockerfile lint findings:
$lint"

shellcheck scripts/*.sh .ci/run

echo "check-deploy: compose files, Dockerfile and scripts are fine"
