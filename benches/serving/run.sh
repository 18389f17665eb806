#!/usr/bin/env bash
# Serving benchmark: the same streaming chat client (benches/serving/client.py, the official
# OpenAI SDK) against Sluice (API + worker, through RabbitMQ and Redis) and against llama.cpp's
# llama-server on the same GGUF, one after the other on the same machine, in one run. Prints
# one JSON line per server and concurrency level (output tokens/s, TTFT and time per output
# token p50/p99), then a side-by-side table.
#
#   benches/serving/run.sh [model.gguf]
#
# Environment:
#   SLUICE_SERVING_CONCURRENCY   levels, default 1,4,8
#   SLUICE_SERVING_REQUESTS      requests per level (at least the level), default 16
#   SLUICE_SERVING_MAX_TOKENS    default 128
#   SLUICE_SERVING_SYSTEM_TOKENS a shared system prompt of about this many tokens, default 0
#   SLUICE_SERVING_SERVERS       which to run, default "sluice llama"
#   SLUICE_BIN_DIR               Sluice's binaries, else target/release (built if missing)
#   SLUICE_GUARD_CLASSIFIER      on (default, as deployed; needs scripts/fetch-guard-model) or off
# The engine-level variant of the same requests (no API, broker or Redis; what a GPU machine
# with only the worker binary can run): `sluice-worker serve-bench --model M [--device cuda]
# --clients 1,4,8 --system-tokens 0` (the model needs its tokenizer).
# Both servers get the machine's cores; llama-server runs with -np 8 slots and an 8192-token
# context (1024 per slot), Sluice's worker with its defaults (a batch of 8). Uses the shared
# RabbitMQ and Redis (scripts/ensure-services) under a namespace of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."

model="${1:-$(scripts/fetch-test-model)}"
levels="${SLUICE_SERVING_CONCURRENCY:-1,4,8}"
requests="${SLUICE_SERVING_REQUESTS:-16}"
max_tokens="${SLUICE_SERVING_MAX_TOKENS:-128}"
system_tokens="${SLUICE_SERVING_SYSTEM_TOKENS:-0}"
servers="${SLUICE_SERVING_SERVERS:-sluice llama}"
python="$(scripts/python-env)"
threads="$(nproc)"

source benches/lib/sluice-processes.sh
dir="$(mktemp -d)"
pids=()
stop_all() {
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  pids=()
}
trap 'stop_all; rm -rf "$dir"' EXIT
client() { # base url, key, label
  "$python" benches/serving/client.py --base-url "$1" --api-key "$2" --label "$3" \
    --concurrency "$levels" --requests "$requests" --max-tokens "$max_tokens" \
    --system-tokens "$system_tokens" | tee -a "$dir/results.jsonl"
}

echo "== machine: $threads cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
echo "== model: $model; levels $levels; $requests requests per level; max_tokens $max_tokens; system prompt ~$system_tokens tokens"

for server in $servers; do
  case "$server" in
  sluice)
    sluice_binaries release
    port="$(free_port)"
    export SLUICE_NAMESPACE="bench-serving-$$"
    guard=(SLUICE_GUARD_CLASSIFIER="${SLUICE_GUARD_CLASSIFIER:-on}")
    if [[ "${SLUICE_GUARD_CLASSIFIER:-on}" != off ]]; then
      guard+=(SLUICE_GUARD_MODEL="$(scripts/fetch-guard-model)")
    fi
    RUST_LOG=warn start_sluice "$model" "$port" 300 "${guard[@]}"
    key="$("$bin/sluice-api" keys create --tenant bench)"
    client "http://127.0.0.1:$port/v1" "$key" sluice
    stop_all
    ;;
  llama)
    llama="$(benches/serving/build-llama-server)"
    port="$(free_port)"
    "$llama" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -np 8 -c 8192 \
      >"$dir/llama.log" 2>&1 &
    pids+=($!)
    wait_ready "http://127.0.0.1:$port/health" "llama-server" 300
    client "http://127.0.0.1:$port/v1" none llama-server
    stop_all
    ;;
  *) echo "serving: unknown server $server" >&2; exit 2 ;;
  esac
done

python3 - "$dir/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
servers = list(dict.fromkeys(r["server"] for r in rows))
levels = sorted({r["concurrency"] for r in rows})
by = {(r["server"], r["concurrency"]): r for r in rows}
cols = ["tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "errors"]
print()
print("| clients | " + " | ".join(f"{s} {c}" for c in cols for s in servers) + " |")
print("|---" * (1 + len(cols) * len(servers)) + "|")
for n in levels:
    cells = [str(by.get((s, n), {}).get(c, "")) for c in cols for s in servers]
    print(f"| {n} | " + " | ".join(cells) + " |")
PY
