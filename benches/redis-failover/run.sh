#!/usr/bin/env bash
# What a Redis Cluster primary killed outright (SIGKILL, not a graceful CLUSTER FAILOVER) costs
# jobs in flight: a real API and worker on a cluster of their own (scripts/redis-cluster, 3
# primaries and 3 replicas, node timeout 2 s), JOBS jobs submitted from 8 clients, the primary
# holding the tenant's slot killed halfway; then every accepted job is polled for up to two
# minutes and the tenant's day counter is compared with the tokens the jobs used.
#
#   benches/redis-failover/run.sh [JOBS]    (default 200; tiny model; binaries from
#                                            SLUICE_BIN_DIR, else target/debug, built if missing)
#
# Prints: submits accepted, refused (and with what status), jobs terminal by status, jobs not
# terminal, and the counter against the sum, when the jobs have ended and again 100 s after
# the kill (after the reconciler's first look at admissions cut short). Redis replicates
# asynchronously: what the killed primary acknowledged but had not yet sent to its replica is
# gone, and this shows how much.
set -euo pipefail
cd "$(dirname "$0")/../.."

jobs="${1:-200}"
source benches/lib/sluice-processes.sh
sluice_binaries debug
dir="$(mktemp -d)"
pids=()
cleanup() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  scripts/redis-cluster stop "$dir/cluster" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

urls="$(SLUICE_CLUSTER_BASE_PORT="${SLUICE_CLUSTER_BASE_PORT:-7301}" scripts/redis-cluster start "$dir/cluster")"
"$bin/sluice-worker" tiny-model --out "$dir/tiny" >/dev/null
export SLUICE_REDIS_URL="$urls" SLUICE_REDIS_CLUSTER=true SLUICE_NAMESPACE="bench-kill-$$" RUST_LOG=warn
api_port="$(free_port)"
start_sluice "$dir/tiny" "$api_port" 120 SLUICE_GUARD_CLASSIFIER=off
key="$("$bin/sluice-api" keys create --tenant bench 2>/dev/null | tail -1)"

# The primary that serves the tenant's slot.
tenant_key="$SLUICE_NAMESPACE:tenant:{bench}:reserved"
first="${urls%%,*}"; first_port="${first##*:}"
slot="$(redis-cli -p "$first_port" cluster keyslot "$tenant_key")"
victim="$(redis-cli -p "$first_port" cluster nodes | awk -v s="$slot" '
  $3 ~ /master/ { for (i = 9; i <= NF; i++) { split($i, r, "-"); if (r[2] == "") r[2] = r[1];
    if (s >= r[1] && s <= r[2]) { split($2, a, "[:@]"); print a[2] } } }')"
echo "tenant slot $slot on the primary at port $victim" >&2

python3 - "$api_port" "$key" "$jobs" "$victim" "$dir/cluster/$victim/redis.pid" <<'PY'
import json, os, signal, sys, threading, time, urllib.request

port, key, jobs, victim, pidfile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
base = f"http://127.0.0.1:{port}"

def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except Exception:
        return 0, None

accepted, refused, lock = [], {}, threading.Lock()
todo = list(range(jobs))
def client():
    while True:
        with lock:
            if not todo:
                return
            i = todo.pop()
        body = {"messages": [{"role": "user", "content": f"job {i}"}],
                "max_tokens": 8 + i % 8, "temperature": 0, "ignore_eos": True}
        status, v = call("POST", "/v1/jobs", body)
        with lock:
            if status == 202:
                accepted.append(v["id"])
            else:
                refused[status] = refused.get(status, 0) + 1

threads = [threading.Thread(target=client) for _ in range(8)]
for t in threads: t.start()
while True:
    with lock:
        if len(accepted) + sum(refused.values()) >= jobs // 2:
            break
    time.sleep(0.01)
pid = int(open(pidfile).read())
os.kill(pid, signal.SIGKILL)
killed_at = time.time()
print(f"killed the primary on port {victim} after {len(accepted)} accepted submits")
for t in threads: t.join()

statuses, pending = {}, set(accepted)
deadline = time.time() + 120
while pending and time.time() < deadline:
    for id in list(pending):
        status, v = call("GET", f"/v1/jobs/{id}")
        if status == 200 and v["status"] not in ("queued", "running"):
            statuses[v["status"]] = statuses.get(v["status"], 0) + 1
            usage = (v.get("result") or {}).get("usage") or {}
            statuses.setdefault("_tokens", 0)
            if v["status"] == "succeeded":
                statuses["_tokens"] += usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
            pending.discard(id)
        elif status == 404:
            statuses["missing (404)"] = statuses.get("missing (404)", 0) + 1
            pending.discard(id)
    time.sleep(0.5)
tokens = statuses.pop("_tokens", 0)
print(f"submits: {len(accepted)} accepted, refused {refused}")
print(f"accepted jobs by end state: {statuses}; not terminal after 2 min: {len(pending)}")
if not pending:
    print(f"every accepted job ended by {time.time() - killed_at:.1f} s after the kill")
def books(when):
    usage = call("GET", "/v1/usage")[1]
    print(f"{when}: tenant counter today {usage and usage['usage']['tokens_today']}, "
          f"tokens of succeeded jobs {tokens}, active {usage and usage['usage']['active_jobs']}")
books("once every accepted job ended")
# A submit refused with 503 may have reserved before Redis failed it; the reconciler settles
# such an admission at its first look, a minute after it, and the API's pass every 5 s.
time.sleep(max(0, killed_at + 100 - time.time()))
books("100 s after the kill")
PY
