#!/usr/bin/env bash
# Redis commands per generated token: one streamed job through a real API and worker, on a
# Redis server of its own (so Redis' command statistics count this job only) and the shared
# RabbitMQ, with the real test model.
#
#   benches/stream-commands/run.sh [TOKENS]      (default 200; binaries from SLUICE_BIN_DIR,
#                                                 else target/debug, built if missing)
#
# Prints, for the whole job (submit, queue, generation, the SSE reader, the terminal write),
# each Redis command with its count, then the totals per generated token. The worker's
# heartbeat and the API's background loops run during the job and are counted too. The
# worker's --stream-flush-ms comes from SLUICE_STREAM_FLUSH_MS when set (default 20).
set -euo pipefail
cd "$(dirname "$0")/../.."

tokens="${1:-200}"
source benches/lib/sluice-processes.sh
sluice_binaries debug
model="${SLUICE_MODEL:-$(scripts/fetch-test-model)}"

redis_port="$(free_port)"
api_port="$(free_port)"
dir="$(mktemp -d)"
pids=()
cleanup() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --daemonize yes --logfile "$dir/redis.log"
export SLUICE_REDIS_URL="redis://127.0.0.1:$redis_port"
export SLUICE_NAMESPACE="bench-cmds-$$"
export RUST_LOG=warn
# The classifier is off: this counts the state tier's commands, not the guard's cost.
start_sluice "$model" "$api_port" 120 SLUICE_GUARD_CLASSIFIER=off
key="$("$bin/sluice-api" keys create --tenant bench)"

stats() {
  redis-cli -p "$redis_port" info commandstats |
    sed -n 's/^cmdstat_\([a-z|]*\):calls=\([0-9]*\),.*/\1 \2/p' | sort
}
before="$(stats)"
body=$(printf '{"messages":[{"role":"user","content":"Write a long story about a lighthouse."}],"max_tokens":%d,"temperature":0,"ignore_eos":true}' "$tokens")
id=$(curl -fsS "http://127.0.0.1:$api_port/v1/jobs" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' -d "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
curl -fsS -N "http://127.0.0.1:$api_port/v1/jobs/$id/events" -H "Authorization: Bearer $key" >"$dir/events"
after="$(stats)"
job=$(curl -fsS "http://127.0.0.1:$api_port/v1/jobs/$id" -H "Authorization: Bearer $key")

python3 - "$before" "$after" "$job" "$(grep -c '^event: text' "$dir/events" || true)" <<'PY'
import json, sys
parse = lambda s: {k: int(v) for k, v in (l.split() for l in s.splitlines() if l.strip())}
before, after, job, chunks = parse(sys.argv[1]), parse(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
delta = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}
# The INFO commands of the measurement itself are not the job's.
delta.pop("info", None)
usage = (job.get("result") or {}).get("usage") or {}
generated = usage.get("completion_tokens") or 0
timings = (job.get("result") or {}).get("timings") or {}
decode_ms = timings.get("generation_ms", 0) - timings.get("time_to_first_token_ms", 0)
rate = f", {decode_ms / max(generated - 1, 1):.1f} ms per token after the first" if generated > 1 else ""
print(f"job {job['status']}, {generated} tokens generated{rate}, {chunks} text events streamed")
for k, v in sorted(delta.items(), key=lambda kv: -kv[1]):
    print(f"  {k:<16} {v}")
total = sum(delta.values())
if generated:
    print(f"{total} commands, {total / generated:.2f} per generated token; "
          f"xadd {delta.get('xadd', 0) / generated:.2f}, xread {delta.get('xread', 0) / generated:.2f}, "
          f"expire {delta.get('expire', 0) / generated:.2f} per token")
PY
