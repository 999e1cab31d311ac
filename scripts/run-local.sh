#!/usr/bin/env bash
# `make run`: serve the API on the sandbox provider. Without REDIS_URL it starts a local
# redis-server with AOF persistence under ./var/redis, on a Unix socket so that it never
# collides with another Redis on this machine, and stops it when the service stops.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv}
port=${PORT:-8000}
started_redis=""

if [ -z "${REDIS_URL:-}" ]; then
  mkdir -p var/redis
  socket="$PWD/var/redis/redis.sock"
  if ! redis-cli -s "$socket" ping >/dev/null 2>&1; then
    redis-server --port 0 --unixsocket "$socket" --unixsocketperm 700 \
      --dir "$PWD/var/redis" --appendonly yes --appendfsync everysec \
      --daemonize yes --pidfile "$PWD/var/redis/redis.pid" --logfile "$PWD/var/redis/redis.log"
    for _ in $(seq 50); do redis-cli -s "$socket" ping >/dev/null 2>&1 && break; sleep 0.1; done
    started_redis=1
  fi
  export REDIS_URL="unix://$socket"
  # The CLI (`.venv/bin/payments ...`) reads this when REDIS_URL is unset: same data as here.
  echo "$REDIS_URL" > var/redis.url
  echo "Redis: $REDIS_URL (AOF under var/redis)"
fi
export RECEIPTS_DIR=${RECEIPTS_DIR:-var/receipts}

stop_redis() {
  if [ -n "$started_redis" ] && [ -f var/redis/redis.pid ]; then
    kill "$(cat var/redis/redis.pid)" 2>/dev/null || true
  fi
}
trap stop_redis EXIT

echo "Serving on http://127.0.0.1:$port  (API docs: http://127.0.0.1:$port/docs)"
# `payments serve` gives uvicorn the proxies the app trusts (FORWARDED_ALLOW_IPS), none by default.
"$venv/bin/payments" serve --host "${HOST:-127.0.0.1}" --port "$port"
