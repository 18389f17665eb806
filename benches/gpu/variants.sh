#!/usr/bin/env bash
# Side-by-side runs of `sluice-worker bench` on one GPU lease: the same binary and model once
# per variant (a set of environment switches), the variants alternated for some rounds, so a
# change is measured against its own baseline on the same card (leases differ by 20 % or more).
# Run benches/gpu/run.sh with --keep --workdir DIR first for the model (and the comparison with
# transformers); this script only times Sluice.
#
#   benches/gpu/variants.sh <sluice-worker[.xz]> <model dir> <rounds> <name>[=VAR=VALUE[,VAR=VALUE...]] ...
#   benches/gpu/variants.sh sluice-worker.xz /tmp/w/qwen2-7b-random 2 \
#       graphs nographs=SLUICE_CUDA_GRAPHS=off
#
# Prints each run's figures and, per variant, whether its single-stream greedy tokens equal the
# first variant's. Environment: PYTHON (default python3), SLUICE_BENCH_ARGS (extra bench
# arguments, default "--batches 1,8,32 --dtype bf16").
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
bin="$(realpath "$1")"
model="$2"
rounds="$3"
shift 3
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
source "$here/libs.sh"
out="$(mktemp -d "${TMPDIR:-/tmp}/sluice-variants.XXXXXX")"
read -r -a extra <<<"${SLUICE_BENCH_ARGS:---batches 1,8,32 --dtype bf16}"

for round in $(seq 1 "$rounds"); do
  for variant in "$@"; do
    name="${variant%%=*}"
    vars=()
    [[ "$variant" == *=* ]] && IFS=, read -r -a vars <<<"${variant#*=}"
    echo "== round $round, $name ${vars[*]:-}"
    env "${vars[@]}" "$bin" bench --model "$model" --device cuda "${extra[@]}" \
      --logits-out "$out/$name-$round.f32" 2>&1 | grep -v '^{' | sed 's/^/  /'
  done
done

first="${1%%=*}"
for variant in "$@"; do
  name="${variant%%=*}"
  for round in $(seq 1 "$rounds"); do
    if cmp -s "$out/$first-1.f32.tokens.json" "$out/$name-$round.f32.tokens.json"; then
      echo "$name round $round: single-stream greedy tokens identical to $first"
    else
      echo "$name round $round: single-stream greedy tokens DIFFER from $first:"
      echo "  $first: $(cat "$out/$first-1.f32.tokens.json")"
      echo "  $name: $(cat "$out/$name-$round.f32.tokens.json")"
    fi
  done
done
