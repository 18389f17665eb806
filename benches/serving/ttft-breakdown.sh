#!/usr/bin/env bash
# Where a streamed job's time to first token goes: one API and one worker (the real test model,
# the classifier on), then N jobs one at a time, each submitted and its event stream read. For
# each job it prints the submit's HTTP time, when the first text event arrived (after the
# submit began), and the job's own timings: queued_ms (accepted → the worker starts it) and
# the worker's time_to_first_token_ms (prefill and the first decode step), and the stream lag:
# how long after the worker's first token the first text event arrived (the time from the end
# of the submit to that event, less queued_ms and time_to_first_token_ms).
#
#   benches/serving/ttft-breakdown.sh [jobs] [system-tokens]
#
# jobs: default 6; the first one warms up (without a system prompt). system-tokens: a system
# prompt of about this many tokens (default 0: none), the same for every later job of the
# tenant: the second of them shows what the prefix cache saves (`cached` tokens per job).
#
# Binaries from SLUICE_BIN_DIR, else target/debug (built if missing). Uses the shared RabbitMQ
# and Redis under a namespace of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."

jobs="${1:-6}"
system_tokens="${2:-0}"
source benches/lib/sluice-processes.sh
sluice_binaries debug
model="${SLUICE_MODEL:-$(scripts/fetch-test-model)}"
port="$(free_port)"
dir="$(mktemp -d)"
export SLUICE_NAMESPACE="bench-ttft-$$" RUST_LOG=warn
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"' EXIT
start_sluice "$model" "$port" 120 SLUICE_GUARD_MODEL="$(scripts/fetch-guard-model)"
key="$("$bin/sluice-api" keys create --tenant bench 2>/dev/null)"

python3 - "http://127.0.0.1:$port" "$key" "$jobs" "$system_tokens" <<'PY'
import json, sys, time, urllib.request

base, key, jobs, system_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# 19 tokens a line with the Qwen2.5 tokenizer, as in benches/serving/client.py.
system = ("You are a careful assistant for a library; answer clearly, cite no sources, "
          "stay polite. ") * (system_tokens // 19)
auth = {"Authorization": f"Bearer {key}"}

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={**auth, "Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)

for i in range(jobs):
    messages = [{"role": "user", "content":
                 f"Write a long, detailed essay about the water cycle ({i})."}]
    if system and i > 0:
        messages.insert(0, {"role": "system", "content": system})
    body = {"messages": messages, "max_tokens": 16, "temperature": 0}
    t0 = time.perf_counter()
    job = json.load(call("POST", "/v1/jobs", body))
    t1 = time.perf_counter()
    first = None
    with call("GET", f"/v1/jobs/{job['id']}/events") as events:
        for line in events:
            if first is None and line.startswith(b"event: text"):
                first = time.perf_counter()
            if line.startswith(b"event: done"):
                break
    view = json.load(call("GET", f"/v1/jobs/{job['id']}"))
    t, u = view["result"]["timings"], view["result"]["usage"]
    print(f"job {i}{' (warm-up)' if i == 0 else ''}: submit {1000 * (t1 - t0):.1f} ms, "
          f"first text event {1000 * (first - t0):.1f} ms after the submit began; "
          f"queued_ms {t['queued_ms']}, worker time_to_first_token_ms "
          f"{t['time_to_first_token_ms']}, prompt {u['prompt_tokens']} tokens "
          f"({u.get('cached_tokens', 0)} cached); stream lag "
          f"{1000 * (first - t1) - t['queued_ms'] - t['time_to_first_token_ms']:.1f} ms")
PY
