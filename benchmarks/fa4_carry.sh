#!/usr/bin/env bash
# Packs FlashAttention-4 (the CuTe-DSL kernels, `pip install flash-attn-4`) for a GPU machine that has no
# internet: downloads the Linux / Python 3.12 wheels of it and of what it needs beyond PyTorch and unpacks them
# into one folder (264 MB). The device tool carries at most 64 MiB per call, so the folder travels in two
# xz archives over two calls on the same warm machine (about 5 minutes here, mostly xz):
#   .fa4a/ir.tar.xz    the CuTe-DSL compiler library alone (193 MB, about 50 MB packed)
#   .fa4b/rest.tar.xz  everything else (about 18 MB packed)
#
#     bash benchmarks/fa4_carry.sh
#
# On the GPU machine, call 1 (carry [".fa4a"]), then at once call 2 (carry [".fa4b"]): a warm machine keeps
# ignored folders of the repository between calls, and gives itself back after 30 idle seconds.
#     call 1: mkdir -p .fa4site && tar -xJf .fa4a/ir.tar.xz -C .fa4site && du -sh .fa4site
#     call 2: tar -xJf .fa4b/rest.tar.xz -C .fa4site; export TVM_FFI_DISABLE_TORCH_C_DLPACK=1 \
#                 PYTHONPATH=$PWD/.fa4site:$PWD/.fa4site/nvidia_cutlass_dsl/dsl_packages; python3 ...
# The second PYTHONPATH entry does what the wheel's .pth file does in a site-packages folder (PYTHONPATH
# folders do not read .pth files). TVM_FFI_DISABLE_TORCH_C_DLPACK keeps tvm-ffi from compiling a C++ add-on
# at import when PyTorch lacks the DLPack exchange API (the add-on only speeds up passing tensors).
# If call 2 lands on a fresh machine, .fa4site is missing, flash_attn.cute is not found, and gpu_check runs
# without FA4.
# Already on that machine (its image): torch, einops, cuda-bindings, protobuf, typing-extensions.
set -euo pipefail

FA4_VERSION=${FA4_VERSION:-4.0.0b36}
CUTLASS_DSL_VERSION=${CUTLASS_DSL_VERSION:-4.8.1}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$work/wheels" \
  "flash-attn-4==$FA4_VERSION" \
  "nvidia-cutlass-dsl==$CUTLASS_DSL_VERSION" \
  "nvidia-cutlass-dsl-libs-base==$CUTLASS_DSL_VERSION" \
  "nvidia-cutlass-dsl-libs-core==$CUTLASS_DSL_VERSION" \
  "nvidia-cutlass-dsl-libs-cu13==$CUTLASS_DSL_VERSION" \
  "apache-tvm-ffi==${TVM_FFI_VERSION:-0.1.15.post2}" \
  "quack-kernels==${QUACK_VERSION:-0.6.5}"

mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do
  python3 -m zipfile -e "$wheel" "$work/site"
done
echo "unpacked: $(du -sh "$work/site" | cut -f1)"

ir=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs
pack() {  # pack DEST TAR-ARGS...: written under a temporary name, then renamed
  mkdir -p "$(dirname "$1")"
  tar -C "$work/site" -cf - "${@:2}" | xz -9e -T0 > "$1.tmp"
  mv "$1.tmp" "$1"
  ls -l "$1"
}
pack "$root/.fa4a/ir.tar.xz" $(cd "$work/site" && ls -d "./$ir"/_cutlass_ir.*)
pack "$root/.fa4b/rest.tar.xz" --exclude "./$ir/_cutlass_ir.*" --exclude ./torch_c_dlpack_ext .
