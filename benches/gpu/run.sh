#!/usr/bin/env bash
# One entry point for a GPU machine (PyTorch + transformers installed, no Rust, no network):
# Sluice's CUDA worker against transformers on a random-weight Qwen2 (bench.py says what is
# measured). Built elsewhere with scripts/build-cuda-worker.
#
#   benches/gpu/run.sh <sluice-worker binary> [shape] [bench.py options...]
#   benches/gpu/run.sh target-cuda/release/sluice-worker              # 7b, cuda, bf16
#   benches/gpu/run.sh target/release/sluice-worker tiny --device cpu --dtype f32   # CPU smoke test
#
# The binary may be given xz-compressed (sluice-worker.xz, about 10 MB instead of 64 MB): it is
# unpacked into a temp dir first.
#
# Environment: PYTHON (default python3, the one with torch), SLUICE_BENCH_TIMEOUT (whole run,
# seconds, default 480), SLUICE_BENCH_OUT (JSON summary, default sluice-gpu-bench.json in the
# current directory).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
bin="$(realpath "$1")"
shape="${2:-7b}"
shift $(( $# >= 2 ? 2 : 1 ))
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
budget="${SLUICE_BENCH_TIMEOUT:-480}"
out="${SLUICE_BENCH_OUT:-$PWD/sluice-gpu-bench.json}"

# Unpacks an .xz binary and puts the libraries it needs on LD_LIBRARY_PATH.
source "$here/libs.sh"

echo "== $(date -u +%FT%TZ) $(uname -n); binary $bin ($(stat -c %s "$bin") bytes)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "== LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
missing="$(ldd "$bin" | grep 'not found' || true)"
if [[ -n "$missing" ]]; then
  echo "run.sh: the binary's libraries are not all found:" >&2
  echo "$missing" >&2
  exit 1
fi
ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc|cudart' || true

export PYTHONUNBUFFERED=1
timeout --kill-after=20 "$budget" "$python" "$here/bench.py" \
  --sluice "$bin" --shape "$shape" --out "$out" "$@"
