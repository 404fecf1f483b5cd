"""Compiles every launch config of the Triton norm kernels for an H100 (sm_90) on a machine without a GPU, and
prints what the compiled code says about speed: shared memory (layout changes go through it), barriers and
16-byte global loads in the PTX. A check that each config builds for the GPU, and a hint, not a timing: the
timings are benchmarks/gpu_check.py's, on the device.

    python benchmarks/norm_kernels_sm90.py            # XL widths: 16 heads x 72, hidden 1152
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pixelflow import norm_kernels as nk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 128)
HEADS, HEAD_DIM, HIDDEN = 16, 72, 1152


def build(fn, pointers: dict[str, str], ints: list[str], constexprs: dict, warps: int) -> tuple[int, int, int]:
    """(shared bytes, barriers, 16-byte global loads) of `fn` compiled for TARGET. Pointers and integer
    arguments are marked divisible by 16, as Triton specialises them at a launch at XL's sizes."""
    signature = {**pointers, **{name: "i32" for name in ints}, "eps": "fp32",
                 **{name: "constexpr" for name in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + len(ints))}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=TARGET, options={"num_warps": warps})
    ptx = kernel.asm["ptx"]
    return kernel.metadata.shared, ptx.count("bar.sync"), len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90, XL widths\n")
    print("| kernel | tokens per program | warps | form | shared bytes | barriers | 16-byte loads |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    rms_pointers = dict(x_ptr="*bf16", w_ptr="*fp32", rope_ptr="*fp32", out_ptr="*bf16")
    kernels = {"pairs": nk._rms_rope_kernel, "flat": nk._rms_rope_flat_kernel, "partner": nk._rms_rope_partner_kernel}
    for rows, warps, form in nk.CONFIGS["rms_rope"]:
        c = HEADS * HEAD_DIM
        block = triton.next_power_of_2(c // 2 if form == "pairs" else c)
        stats = build(kernels[form], rms_pointers, ["n_rows", "seq", "stride_b", "stride_n"],
                      dict(C=c, HALF_D=HEAD_DIM // 2, BLOCK=block, ROWS=rows), warps)
        print(f"| rms_rope | {rows} | {warps} | {form} | " + " | ".join(map(str, stats)) + " |")
    ln_pointers = dict(x_ptr="*bf16", y_ptr="*bf16", gate_ptr="*fp32", shift_ptr="*fp32", scale_ptr="*fp32",
                       sum_ptr="*bf16", out_ptr="*bf16")
    ln_ints = ["n_rows", "seq", "stride_b", "stride_n", "y_stride_b", "y_stride_n", "gate_stride", "shift_stride",
               "scale_stride"]
    for op in ("layer_norm_modulate", "add_layer_norm_modulate"):
        for rows, warps, form in nk.CONFIGS[op]:
            constexprs = dict(C=HIDDEN, BLOCK=triton.next_power_of_2(HIDDEN), ROWS=rows, SHARED=form == "shared",
                              RESIDUAL=op.startswith("add"))
            stats = build(nk._layer_norm_modulate_kernel, ln_pointers, ln_ints, constexprs, warps)
            print(f"| {op} | {rows} | {warps} | {form} | " + " | ".join(map(str, stats)) + " |")


if __name__ == "__main__":
    main()
