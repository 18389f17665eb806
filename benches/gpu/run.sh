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

if [[ "$bin" == *.xz ]]; then
  unpacked="$(mktemp -d "${TMPDIR:-/tmp}/sluice-worker.XXXXXX")"
  trap 'rm -rf "$unpacked"' EXIT
  if command -v xz >/dev/null; then
    xz -dc "$bin" >"$unpacked/sluice-worker"
  else  # Python's lzma reads .xz too
    "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$bin" "$unpacked/sluice-worker"
  fi
  chmod +x "$unpacked/sluice-worker"
  bin="$unpacked/sluice-worker"
fi

# A CUDA build of the worker is linked against libcuda.so.1 (the driver's), and against cuBLAS,
# cuBLASLt, cuRAND, NVRTC and the CUDA runtime of CUDA 13. The driver's library is found through
# ldconfig or the usual driver folders; the others through the NVIDIA pip packages that PyTorch
# installs (site-packages/nvidia/cu13/lib for CUDA 13 wheels, nvidia/<name>/lib for CUDA 12).
# Only the libraries ldd can't find yet are looked for, each in the first folder that has it.
# Two rounds: a library found in the first may itself need one that is elsewhere.
for _ in 1 2; do
  needed="$(ldd "$bin" | awk '/not found/ {print $1}' | xargs)"
  [[ -z "$needed" ]] && break
  extra="$("$python" - $needed <<'PY'
import glob, os, sys
candidates = []
for base in sys.path:
    candidates += sorted(glob.glob(os.path.join(base, "nvidia", "cu13", "lib")))
    candidates += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
# The driver's own folders, for libcuda.so.1 when ldconfig doesn't know it (never the
# toolkit's stubs, nor compat/: that one is a different driver's library).
candidates += ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu",
               "/usr/lib64", "/usr/lib/wsl/lib"]
dirs = []
for name in sys.argv[1:]:
    for d in candidates:
        if os.path.exists(os.path.join(d, name)):
            if d not in dirs:
                dirs.append(d)
            break
print(":".join(dirs))
PY
)"
  [[ -z "$extra" ]] && break
  export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

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
