#!/bin/sh
# Writes Prometheus' configuration for scraping logikids-sync to stdout (the compose
# `monitoring` profile runs it before Prometheus starts; the tests run it too).
#
# Where the metrics are depends on the service's settings (docs/operations.md, "Metrics"):
#   NODE_ENV=production without METRICS_TOKEN: their own listener, sync:9464, no token;
#   METRICS_TOKEN set: the service port, sync:3000, with the token;
#   otherwise (development): the service port, sync:3000, open.
# Settings (environment): NODE_ENV, METRICS_TOKEN, METRICS_PORT (9464), and optionally
# METRICS_TARGETS (host:port[,host:port...], overriding the above), SCRAPE_INTERVAL (15s),
# RULES_FILE (/etc/prometheus/alerts.yml) and TOKEN_FILE (where the token is written for
# Prometheus to read; /tmp/metrics-token).
set -eu

rules_file=${RULES_FILE:-/etc/prometheus/alerts.yml}
interval=${SCRAPE_INTERVAL:-15s}
token=${METRICS_TOKEN:-}
token_file=${TOKEN_FILE:-/tmp/metrics-token}
if [ -n "${METRICS_TARGETS:-}" ]; then
  targets=$METRICS_TARGETS
elif [ "${NODE_ENV:-development}" = production ] && [ -z "$token" ]; then
  targets="sync:${METRICS_PORT:-9464}"
else
  targets="sync:3000"
fi

# host:port,host:port: blanks dropped, empty entries skipped, each quoted for YAML.
quoted_targets=$(printf '%s' "$targets" | tr -d ' \t\r\n"' | tr ',' '\n' | sed '/^$/d; s/.*/"&"/' | paste -sd, - | sed 's/,/, /g')
[ -n "$quoted_targets" ] || { echo "prometheus-config.sh: no scrape target" >&2; exit 1; }

cat <<CONFIG
global:
  scrape_interval: $interval
  scrape_timeout: $interval
  evaluation_interval: $interval
rule_files:
  - $rules_file
scrape_configs:
  - job_name: logikids-sync
    metrics_path: /metrics
    static_configs:
      - targets: [$quoted_targets]
CONFIG

if [ -n "$token" ]; then
  (umask 077 && printf '%s' "$token" > "$token_file")
  cat <<CONFIG
    authorization:
      type: Bearer
      credentials_file: $token_file
CONFIG
fi
