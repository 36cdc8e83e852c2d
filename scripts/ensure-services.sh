#!/usr/bin/env bash
# Makes sure what the tests talk to is installed and running: PostgreSQL, Redis, HAProxy, wrk, Chromium.
# Idempotent; on a machine that already has them it only checks.
set -euo pipefail

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)   # the dashboard's browser tests (Playwright drives it)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)   # the fleet tests start their own members; never a system etcd
command -v node >/dev/null 2>&1 || need+=(nodejs)   # the Node shop example's test (tests/examples)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v pebble >/dev/null 2>&1 || need+=(pebble)   # Let's Encrypt's test CA: the ACME tests (tests/tls)
if [[ "${1:-}" == "--bench" ]]; then   # `make bench`: the scale benches' backend
  command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
fi
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [[ " ${need[*]:-} " == *" etcd-server "* ]] && command -v systemctl >/dev/null 2>&1; then
  ${SUDO:-} systemctl disable --now etcd >/dev/null 2>&1 || true   # the package starts one; the fleet tests run their own
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
pg_isready -h 127.0.0.1 -p 5432 >/dev/null || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }
