#!/usr/bin/env bash
# The GPU check on a lent GPU machine, run from the repository root:
#   bash crates/gpu-check/run.sh [OUT_DIR] [starflow-gpu-check options...]
# It needs only the folder `cargo xtask gpu-check` prepared (target/gpu-check: the stripped binary built by
# `cargo xtask cuda-build`), the machine's NVIDIA driver, and CUDA 13 cuBLAS/cuRAND/NVRTC/runtime, which it
# looks for in the Python environment's NVIDIA wheels (PyTorch's), torch/lib and /usr/local/cuda*. Results:
# OUT_DIR/report.md, results.json, env.txt (driver, GPU), ldd.txt (which libraries were used).
set -u
out=${1:-${OUT:-gpu-check-out}}
[ $# -gt 0 ] && shift
bin=${STARFLOW_GPU_CHECK_BIN:-target/gpu-check/starflow-gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
if [ ! -x "$bin" ]; then
  echo "run.sh: $bin not found; fix: run \`cargo xtask cuda-build\` then \`cargo xtask gpu-check\` on the build machine and carry target/gpu-check" | tee "$out/error.txt" >&2
  exit 2
fi
{ date -u; uname -srm; if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not available"; fi; } > "$out/env.txt" 2>&1
libdirs=$("$py" - <<'PY' 2>/dev/null
import glob, os, sys
dirs = []
for sp in sys.path:
    for pat in ("nvidia/cu13/lib", "nvidia/*/lib", "torch/lib"):
        dirs += [d for d in glob.glob(os.path.join(sp or ".", pat)) if d not in dirs]
print(":".join(dirs))
PY
)
for d in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libdirs="${libdirs:+$libdirs:}$d"
done
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >> "$out/env.txt"
ldd "$bin" > "$out/ldd.txt" 2>&1
if grep -q "not found" "$out/ldd.txt"; then
  { echo "run.sh: libraries missing for $bin:"; grep "not found" "$out/ldd.txt";
    echo "fix: libcuda.so.1 comes with the NVIDIA driver; for the others install the CUDA 13 wheels (pip install nvidia-cublas nvidia-curand nvidia-cuda-nvrtc nvidia-cuda-runtime) or point LD_LIBRARY_PATH at a CUDA 13 toolkit"; } | tee "$out/error.txt" >&2
  exit 2
fi
"$bin" --device "${DEVICE:-cuda}" --out "$out" --python "$py" "$@"
