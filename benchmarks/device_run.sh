#!/usr/bin/env bash
# The GPU check on the device machine, with FlashAttention-4 from the archives of benchmarks/fa4_carry.sh: two
# calls back to back on one warm machine (it keeps ignored folders between calls, for 30 idle seconds).
#   call 1, carry [".fa4a"], kind "nvidia-h100-x1":  bash benchmarks/device_run.sh unpack
#   call 2, carry [".fa4b"], kind "nvidia-h100-x1":  bash benchmarks/device_run.sh check BUDGET [SKIP WORD ...]
# (with ".whl" carried too, holding omegaconf's wheel, `; bash benchmarks/cuda_smoke.sh` after it runs train.py
# and sample_ddp.py on the GPU: about 110 s)
# `check` writes $OUT/gpu_check.log and $OUT/gpu_check.json, and stops gpu_check 30 s after BUDGET seconds
# (give the device call a timeout of BUDGET + 60). Without SKIP words it skips what earlier runs measured
# and keeps what the next H100 run needs (see gpu_check.py's docstring). GPU_CHECK_ARGS adds arguments, e.g.
# a dry run here: GPU_CHECK_ARGS="--tiny --no-omegaconf --steps 1 --batch-sizes 2" bash ... check 120
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  unpack)
    mkdir -p .fa4site && tar -xJf .fa4a/ir.tar.xz -C .fa4site && du -sh .fa4site ;;
  check)
    budget=${2:?usage: device_run.sh check BUDGET [SKIP WORD ...]}
    [[ $budget =~ ^[0-9]+$ ]] || { echo "BUDGET must be whole seconds, got '$budget'" >&2; exit 2; }
    shift 2
    if [ $# -eq 0 ]; then
      set -- "Triton normalisation" "FlashAttention-4 tilings" "self-attention" compile_mode =False attention=
    fi
    if [ -f .fa4b/rest.tar.xz ] && [ -d .fa4site ]; then
      tar -xJf .fa4b/rest.tar.xz -C .fa4site || echo "unpacking .fa4b failed: FlashAttention-4 may not import"
    else
      echo "no .fa4site from call 1 (or no .fa4b): running without FlashAttention-4"
    fi
    export TVM_FFI_DISABLE_TORCH_C_DLPACK=1 PYTHONUNBUFFERED=1
    export PYTHONPATH=$PWD/.fa4site:$PWD/.fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
    out=${OUT:-.devout}
    mkdir -p "$out"
    timeout -k 15 $((budget + 30)) python3 benchmarks/gpu_check.py ${GPU_CHECK_ARGS:-} --budget "$budget" --out "$out" --skip "$@" 2>&1 \
      | tee "$out/gpu_check.log" ;;
  *)
    echo "usage: bash benchmarks/device_run.sh unpack | check BUDGET [SKIP WORD ...]" >&2
    exit 2 ;;
esac
