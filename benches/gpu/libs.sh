# Sourced by run.sh and variants.sh with `bin` (the sluice-worker binary) and `python` set:
# unpacks an xz-compressed binary into a temp dir (setting `bin` to it), and puts the CUDA
# libraries the binary needs on LD_LIBRARY_PATH.

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

