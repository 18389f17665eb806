# Sourced by the benchmark scripts that run Sluice as processes for one measurement
# (benches/stream-commands, benches/serving). The caller sets `bin` (the binaries' folder,
# or through sluice_binaries) and `dir` (a scratch folder for the logs), and owns the `pids`
# array (for its cleanup).

# sluice_binaries PROFILE: sets `bin` to SLUICE_BIN_DIR, else target/PROFILE after building
# sluice-api and sluice-worker there (debug or release), and makes sure the shared RabbitMQ and
# Redis answer.
sluice_binaries() {
  bin="${SLUICE_BIN_DIR:-target/$1}"
  if [[ -z "${SLUICE_BIN_DIR:-}" ]]; then
    local profile=()
    [[ "$1" == release ]] && profile=(--release)
    cargo build "${profile[@]}" --quiet -p sluice-api -p sluice-worker --bins
  fi
  scripts/ensure-services >/dev/null
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_ready URL WHAT SECONDS: returns once URL answers; exits with the logs in $dir when a
# process in `pids` died or SECONDS passed.
wait_ready() {
  local url="$1" what="$2" seconds="$3"
  for _ in $(seq "$seconds"); do
    if curl -fsS "$url" >/dev/null 2>&1; then return 0; fi
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 1
  done
  echo "$(basename "$0"): $what did not come up:" >&2
  tail -n 20 "$dir"/*.log >&2
  exit 1
}

# start_sluice MODEL PORT SECONDS [VAR=VALUE ...]: one sluice-worker on MODEL and one
# sluice-api on 127.0.0.1:PORT serving its tokenizer (the VAR=VALUE settings go to the API;
# the worker reads the exported environment), logs in $dir; returns once /readyz answers.
start_sluice() {
  local model="$1" port="$2" seconds="$3"
  shift 3
  SLUICE_MODEL="$model" "$bin/sluice-worker" run >"$dir/worker.log" 2>&1 &
  pids+=($!)
  env "$@" SLUICE_TOKENIZER="$model" SLUICE_API_ADDR="127.0.0.1:$port" \
    "$bin/sluice-api" serve >"$dir/api.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port/readyz" "the Sluice API or worker" "$seconds"
}
