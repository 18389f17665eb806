#!/usr/bin/env bash
# The batch path end to end: one API and one worker (the tiny random-weight model, so the
# queue, Redis and the batch runner are what is measured, not the model) on the shared
# RabbitMQ and Redis.
#
#   benches/batch/run.sh [LINES] [PROFILE] [SINGLES]
#       (default 10000 lines, debug binaries, as many single jobs as lines; binaries from
#       SLUICE_BIN_DIR, else target/PROFILE, built if missing)
#
# Prints: the upload's size and its rate (the API checks every line as it streams in); the
# time from `POST /v1/batches` to `completed` for 1-token lines; and, for comparison, the same
# number of 1-token jobs sent one by one to `POST /v1/jobs` (32 clients) and polled to the end.
# The guard's learned classifier is off in both (its cost per text is measured by
# `cargo bench -p sluice-guard`); SLUICE_BATCH_* settings pass through to the API.
set -euo pipefail
cd "$(dirname "$0")/../.."

lines="${1:-10000}"
source benches/lib/sluice-processes.sh
sluice_binaries "${2:-debug}"

api_port="$(free_port)"
dir="$(mktemp -d)"
pids=()
cleanup() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

"$bin/sluice-worker" tiny-model --out "$dir/model" >/dev/null
export SLUICE_NAMESPACE="bench-batch-$$"
export RUST_LOG=warn
start_sluice "$dir/model" "$api_port" 120 SLUICE_GUARD_CLASSIFIER=off \
  SLUICE_FILES_STORE="$dir/files" SLUICE_DEFAULT_TOKENS_PER_DAY=0 \
  SLUICE_DEFAULT_TOKENS_PER_MONTH=0 SLUICE_DEFAULT_MAX_ACTIVE_JOBS=0 \
  SLUICE_DEFAULT_MAX_QUEUED_JOBS=0 SLUICE_DEFAULT_REQUESTS_PER_SECOND=0 \
  SLUICE_DEFAULT_REQUESTS_PER_MINUTE=0 SLUICE_MAX_QUEUED_JOBS=0 \
  SLUICE_IP_REQUESTS_PER_SECOND=0 SLUICE_IP_REQUESTS_PER_MINUTE=0
key="$("$bin/sluice-api" keys create --tenant bench)"

python3 - "http://127.0.0.1:$api_port" "$key" "$lines" "${3:-$lines}" <<'PY'
import concurrent.futures, json, sys, time, urllib.request

base, key, n, singles = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
auth = {"Authorization": f"Bearer {key}"}

def call(method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    h = dict(auth, **({"Content-Type": "application/json"} if data else {}), **(headers or {}))
    with urllib.request.urlopen(urllib.request.Request(base + path, data, h, method=method)) as r:
        return json.load(r)

model = call("GET", "/v1/models")["data"][0]["id"]
messages = [{"role": "user", "content": "Say one word."}]
jsonl = "\n".join(
    json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "messages": messages, "max_tokens": 1}})
    for i in range(n)
).encode()
boundary = "bench-boundary-1f2e"
form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
        f"\r\n").encode() + jsonl + f"\r\n--{boundary}--\r\n".encode()
started = time.perf_counter()
request = urllib.request.Request(base + "/v1/files", form, dict(
    auth, **{"Content-Type": f"multipart/form-data; boundary={boundary}"}), method="POST")
with urllib.request.urlopen(request) as r:
    file = json.load(r)
upload_s = time.perf_counter() - started
print(f"upload: {n} lines, {len(jsonl) / 1e6:.2f} MB in {upload_s:.2f} s: "
      f"{n / upload_s:,.0f} lines/s, {len(jsonl) / 1e6 / upload_s:.1f} MB/s")

started = time.perf_counter()
batch = call("POST", "/v1/batches", {"input_file_id": file["id"],
             "endpoint": "/v1/chat/completions", "completion_window": "24h"})
while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(0.2)
    batch = call("GET", f"/v1/batches/{batch['id']}")
batch_s = time.perf_counter() - started
counts = batch["request_counts"]
print(f"batch: {counts['completed']} of {counts['total']} completed ({counts['failed']} failed) "
      f"in {batch_s:.1f} s: {n / batch_s:,.0f} lines/s, {batch_s / n * 1000:.2f} ms per line")

def one(i):
    job = call("POST", "/v1/jobs", {"messages": messages, "max_tokens": 1, "priority": "batch"})
    while True:
        view = call("GET", f"/v1/jobs/{job['id']}")
        if view["status"] not in ("queued", "running"):
            return view["status"]
        time.sleep(0.05)

started = time.perf_counter()
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    statuses = list(pool.map(one, range(singles)))
single_s = time.perf_counter() - started
print(f"single submits: {statuses.count('succeeded')} of {singles} succeeded in {single_s:.1f} s: "
      f"{singles / single_s:,.0f} jobs/s, {single_s / singles * 1000:.2f} ms per job "
      f"(32 clients polling)")
PY
