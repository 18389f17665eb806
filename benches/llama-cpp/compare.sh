#!/usr/bin/env bash
# Side-by-side CPU speed: llama.cpp (through llama-cpp-python) and Sluice's engine on the same
# GGUF file, on the same machine, in one run. Prints both sets of figures and the ratios.
#
#   benches/llama-cpp/compare.sh [model.gguf]
#
# The model defaults to the test model (scripts/fetch-test-model). llama-cpp-python is built
# from source into a throwaway virtualenv ($SLUICE_LLAMA_VENV, default under /tmp) the first
# time; nothing is installed into the project. Both sides use 2 threads (SLUICE_BENCH_THREADS),
# a 64-token prompt and 64 greedy decode steps (SLUICE_BENCH_STEPS).
#
# llama.cpp is built with its defaults (-march=native) unless SLUICE_LLAMA_CMAKE_ARGS says
# otherwise (it becomes CMAKE_ARGS of the build; use a fresh SLUICE_LLAMA_VENV). On an Intel
# Xeon with AMX in a VM the native build crashed with a segmentation fault; this built one that
# runs (AVX-512 with VNNI, no AMX):
#   SLUICE_LLAMA_VENV=/tmp/llama-noamx SLUICE_LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON
#   -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
#   -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
#   -DGGML_AMX_BF16=OFF"
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
model="${1:-$("$root/scripts/fetch-test-model")}"
threads="${SLUICE_BENCH_THREADS:-2}"
steps="${SLUICE_BENCH_STEPS:-64}"
venv="${SLUICE_LLAMA_VENV:-/tmp/sluice-llama-cpp-venv}"
readonly LLAMA_CPP_PYTHON="0.3.36"

if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON into $venv (first run only, several minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  # llama.cpp's default build: tuned for this CPU (-march=native), its fastest configuration.
  CMAKE_ARGS="${SLUICE_LLAMA_CMAKE_ARGS:-${CMAKE_ARGS:-}}" \
    "$venv/bin/pip" install --quiet --no-cache-dir "llama-cpp-python==$LLAMA_CPP_PYTHON" >&2
fi

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
echo "== model: $model"

if ! llama_out="$("$venv/bin/python" - "$model" "$threads" "$steps" <<'PY'
import sys, time
import numpy as np
from llama_cpp import Llama

path, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=512, n_batch=64, n_threads=threads,
            n_threads_batch=threads, verbose=False)
prompt = [100 + i * 7 for i in range(64)]  # the same token ids as Sluice's bench
# Warm-up pass (page in the weights), then the measured one.
def next_token():
    # The last position's logits (llama.cpp keeps only those without logits_all).
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(logits.argmax())

llm.eval(prompt); llm.reset()
t = time.perf_counter(); llm.eval(prompt); tok = next_token()
ttft = time.perf_counter() - t
pp = len(prompt) / ttft
t = time.perf_counter()
for _ in range(steps):
    llm.eval([tok])
    tok = next_token()
tg = steps / (time.perf_counter() - t)
print(f"llama.cpp prompt processing (64 tokens): {pp:.1f} tok/s")
print(f"llama.cpp time to first token (64 tokens): {ttft * 1e3:.1f} ms")
print(f"llama.cpp decode batch 1: {tg:.1f} tok/s")
PY
)"; then
  echo "compare.sh: llama.cpp failed (see above; a -march=native build can crash in a VM, see" \
    "SLUICE_LLAMA_CMAKE_ARGS at the top of this script)" >&2
  exit 1
fi
echo "$llama_out"

cd "$root"
cargo build --quiet --release -p sluice-worker >&2
sluice_out="$(RAYON_NUM_THREADS="$threads" target/release/sluice-worker bench --model "$model" \
  --steps "$steps" --batches 1,2,4,8)"
echo "$sluice_out"
# The same engine on candle's quantized kernels instead of Sluice's (worker/src/kernels/qmm.rs).
RAYON_NUM_THREADS="$threads" target/release/sluice-worker bench --model "$model" \
  --steps "$steps" --batches 1,8 --kernel candle

pick() { grep -m1 "$1" | sed -E 's/.*: ([0-9.]+) tok\/s.*/\1/'; }
l_pp="$(echo "$llama_out" | pick 'prompt processing')"
l_tg="$(echo "$llama_out" | pick 'decode batch 1')"
s_pp="$(echo "$sluice_out" | pick '^prompt processing')"
s_tg="$(echo "$sluice_out" | pick '^decode batch 1:')"
s_b8="$(echo "$sluice_out" | pick '^decode batch 8:')"
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo "== ratios (Sluice / llama.cpp, same run)"
echo "prompt processing: $(ratio "$s_pp" "$l_pp")x"
echo "single-stream decode: $(ratio "$s_tg" "$l_tg")x"
echo "aggregate decode at 8 concurrent vs llama.cpp single stream: $(ratio "$s_b8" "$l_tg")x"
echo "aggregate decode at 8 concurrent vs Sluice single stream: $(ratio "$s_b8" "$s_tg")x"
