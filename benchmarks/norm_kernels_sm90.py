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
POINTERS = ("*bf16", "*fp32", "*fp32", "*bf16")


def build(fn, names: list[str], ints: int, constexprs: dict, warps: int) -> tuple[int, int, int]:
    """(shared bytes, barriers, 16-byte global loads) of `fn` compiled for TARGET. Pointers and integer
    arguments are marked divisible by 16, as Triton specialises them at a launch at XL's sizes."""
    signature = dict(zip(names, POINTERS + ("i32",) * ints + ("fp32",)))
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(POINTERS) + ints)}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=TARGET, options={"num_warps": warps})
    ptx = kernel.asm["ptx"]
    return kernel.metadata.shared, ptx.count("bar.sync"), len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90, XL widths\n")
    print("| kernel | tokens per program | warps | form | shared bytes | barriers | 16-byte loads |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    rms_args = ["x_ptr", "w_ptr", "rope_ptr", "out_ptr", "n_rows", "seq", "stride_b", "stride_n", "eps"]
    kernels = {"pairs": nk._rms_rope_kernel, "flat": nk._rms_rope_flat_kernel, "partner": nk._rms_rope_partner_kernel}
    for rows, warps, form in nk.CONFIGS["rms_rope"]:
        c = HEADS * HEAD_DIM
        block = triton.next_power_of_2(c // 2 if form == "pairs" else c)
        stats = build(kernels[form], rms_args, 4, dict(C=c, HALF_D=HEAD_DIM // 2, BLOCK=block, ROWS=rows), warps)
        print(f"| rms_rope | {rows} | {warps} | {form} | " + " | ".join(map(str, stats)) + " |")
    ln_args = ["x_ptr", "shift_ptr", "scale_ptr", "out_ptr", "n_rows", "seq", "stride_b", "stride_n", "shift_stride",
               "scale_stride", "eps"]
    for rows, warps, form in nk.CONFIGS["layer_norm_modulate"]:
        constexprs = dict(C=HIDDEN, BLOCK=triton.next_power_of_2(HIDDEN), ROWS=rows, SHARED=form == "shared")
        stats = build(nk._layer_norm_modulate_kernel, ln_args, 6, constexprs, warps)
        print(f"| layer_norm_modulate | {rows} | {warps} | {form} | " + " | ".join(map(str, stats)) + " |")


if __name__ == "__main__":
    main()
