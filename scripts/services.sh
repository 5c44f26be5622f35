#!/usr/bin/env bash
# Start local PostgreSQL, Redis and the S3 endpoint (moto's standalone server) when they are down (CI and fresh
# machines must not assume they run). Each check is cheap, so running this again is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
s3_port="${MCS_TEST_S3_PORT:-9555}"
# /moto-api/ (its dashboard) answers whatever the state holds; data.json, a dump of the state, can fail with a 500
s3_up() { curl -sf -o /dev/null "http://127.0.0.1:${s3_port}/moto-api/"; }

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi
if ! s3_up; then
  echo "starting the S3 endpoint (moto server) on 127.0.0.1:${s3_port}"
  mkdir -p var/log
  # setsid: the server outlives this script (and its CI step) like the daemonized Redis; in-memory, nothing persists
  setsid .venv/bin/moto_server -H 127.0.0.1 -p "$s3_port" >>var/log/moto.log 2>&1 </dev/null &
  for _ in $(seq 1 60); do s3_up && break; sleep 0.5; done
fi
pg_isready -h 127.0.0.1 -p 5432
redis-cli -h 127.0.0.1 -p 6379 ping
s3_up && echo "S3 endpoint (moto): http://127.0.0.1:${s3_port}" || { echo "the S3 endpoint did not start: see var/log/moto.log"; exit 1; }
