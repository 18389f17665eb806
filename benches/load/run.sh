#!/usr/bin/env bash
# End-to-end load benchmark against the local RabbitMQ and Redis (not a test):
#   1. queue overhead: 1-token jobs on the tiny model, end to end minus generation time;
#   2. submit path: 64 connections for 10 s with every check on (auth, per-key and per-IP rate
#      limits, guard, token count, quota / concurrency / queue-cap admission, publish with
#      confirms), every limit set high enough never to reject.
# Uses the binaries of the given profile (default release: `cargo build --release` first).
#
#   benches/load/run.sh [release|debug] [connections] [seconds]
# SLUICE_LOAD_CLASSIFIER=off runs the API without the learned injection classifier (the rules
# still run), to measure what the classifier costs on the submit path. SLUICE_REDIS_URL and
# SLUICE_REDIS_CLUSTER=true (with the node URLs, e.g. from scripts/redis-cluster start) run it
# against a Redis Cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${1:-release}"
conns="${2:-64}"
secs="${3:-10}"
bin="target/$profile"
ns="load$(date +%s)"
export SLUICE_NAMESPACE="$ns"
tiny="$(mktemp -d)"
trap 'kill $api $worker 2>/dev/null || true; rm -rf "$tiny"' EXIT

"$bin/sluice-worker" tiny-model --out "$tiny" >/dev/null
port=$((20000 + RANDOM % 20000))
# Every limit is set (0 would switch its check off) but high enough never to reject: the
# rate-limit, quota, concurrency and queue-cap checks all run on every request.
unlimited=(--default-requests-per-second 1000000 --default-requests-per-minute 60000000
  --default-tokens-per-day 1000000000000 --default-tokens-per-month 1000000000000
  --default-max-active-jobs 10000000 --default-max-queued-jobs 10000000
  --max-queued-jobs 10000000 --ip-requests-per-second 1000000
  --ip-requests-per-minute 60000000)
guard=(--guard-model "$(scripts/fetch-guard-model)" --guard-classifier "${SLUICE_LOAD_CLASSIFIER:-on}")
RUST_LOG=warn "$bin/sluice-api" --addr "127.0.0.1:$port" --tokenizer "$tiny" "${unlimited[@]}" "${guard[@]}" &
api=$!
key="$("$bin/sluice-api" keys create --tenant load | tail -1)"
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done

echo "== queue overhead (tiny model worker, one job at a time)"
RUST_LOG=warn "$bin/sluice-worker" --model "$tiny" &
worker=$!
sleep 2  # model load and consumer start, not part of any job's latency
for watch in events poll; do
  "$bin/sluice-load" --mode e2e --base "http://127.0.0.1:$port" --key "$key" --e2e-jobs 200 \
    --e2e-watch "$watch"
done
kill $worker; wait $worker 2>/dev/null || true

echo "== submit path ($profile build, $(nproc) cores, $conns connections, ${secs}s, no worker)"
# CPU time (user + system, clock ticks) of each process on the path, to show where the
# cores go: the API, Redis, RabbitMQ and the load generator share them.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Every Redis server on the machine (one, or a cluster's nodes: SLUICE_REDIS_CLUSTER=true with
# SLUICE_REDIS_URL naming them), summed.
redis_ticks() {
  local t=0 p
  for p in $(pgrep -x redis-server); do t=$((t + $(ticks "$p"))); done
  echo "$t"
}
beam_pid="$(pgrep -f beam.smp | head -1 || true)"
declare -A before
for p in "$api" "$beam_pid"; do [ -n "$p" ] && before[$p]="$(ticks "$p")"; done
redis_before="$(redis_ticks)"
# (The subshell's cutime + cstime after the load generator exits are the generator's CPU.)
out="$("$bin/sluice-load" --mode submit --base "http://127.0.0.1:$port" --key "$key" \
  --connections "$conns" --duration "$secs"
  awk '{print "children_ticks", $16 + $17}' "/proc/$BASHPID/stat")"
echo "$out" | grep -v '^children_ticks '
load_ticks="$(echo "$out" | sed -n 's/^children_ticks //p')"
requests="$(echo "$out" | sed -n 's/^submit: \([0-9]*\) requests.*/\1/p')"
hz="$(getconf CLK_TCK)"
if [ -n "$requests" ] && [ "$requests" -gt 0 ]; then
  for named in "sluice-api:$api" "redis-server:redis" "rabbitmq:$beam_pid"; do
    name="${named%%:*}"; p="${named#*:}"
    [ -n "$p" ] || continue
    if [ "$p" = redis ]; then
      used=$(( $(redis_ticks) - redis_before ))
    else
      used=$(( $(ticks "$p") - ${before[$p]} ))
    fi
    awk -v n="$name" -v t="$used" -v hz="$hz" -v r="$requests" -v s="$secs" \
      'BEGIN { printf "cpu: %-14s %6.1f µs per request, %5.1f %% of a core\n", n, t / hz / r * 1e6, t / hz / s * 100 }'
  done
  awk -v t="${load_ticks:-0}" -v hz="$hz" -v r="$requests" -v s="$secs" \
    'BEGIN { printf "cpu: %-14s %6.1f µs per request, %5.1f %% of a core\n", "load generator", t / hz / r * 1e6, t / hz / s * 100 }'
fi

kill $api $worker 2>/dev/null || true
wait 2>/dev/null || true
if [ "${SLUICE_REDIS_CLUSTER:-false}" = true ]; then
  for url in ${SLUICE_REDIS_URL//,/ }; do
    p="${url##*:}"
    redis-cli -p "$p" --scan --pattern "$ns:*" | xargs -r -n 1 redis-cli -p "$p" del >/dev/null 2>&1 || true
  done
else
  redis-cli --scan --pattern "$ns:*" | xargs -r -n 500 redis-cli del >/dev/null
fi
for q in jobs.interactive jobs.batch jobs.dead; do
  rabbitmqctl --quiet delete_queue "$ns.$q" >/dev/null 2>&1 || true
done
