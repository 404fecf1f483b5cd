"""Fast sampling: the network's forward with merged, compiled and graph-captured pieces.

`accelerate(pipe)` swaps `pipe.denoiser` (what the sampling loop calls) for a `FastDenoiser` built from
`pipe.model`, and sets the pipeline's precision. The network in `pixelflow/model/` stays the reference and is
never changed: a FastDenoiser reads its weights and computes the same function, in the same order of
operations, up to the rounding of the chosen precision (tests/test_fast_path.py checks each switch against
the plain path).

Switches (FastOptions; "auto" resolves per device: everything on for CUDA, nothing on elsewhere, where
`accelerate` then leaves the plain model in place):
  precision    "bf16": autocast as the plain bf16 path does, with the matmul weights cast once (not per call).
  merge_qkv    q, k, v projections as one matmul (k, v for cross-attention), weights concatenated once.
  merge_adaln  every block's adaLN modulation Linear(SiLU(c)) as one matmul: c is the same for all blocks.
  compile      torch.compile of one transformer block (a regional compile: the 28 blocks share one compiled
               region, recompiled once per input shape unless compile_dynamic; twice with fused_residual, where
               the first block, with no residual pending, is its own region). Fuses the elementwise work
               (the gates and residuals with the RMSNorm before the MLP; without fused_norms also LayerNorm +
               modulation and RMSNorm + RoPE of q/k) into a few kernels, computing in float32 in registers
               without float32 round trips through memory.
  attention    self-attention kernel: "auto" measures PyTorch's exact fused kernels (cuDNN, flash,
               memory-efficient), and flash-attn 2 and FlashAttention-4 when installed, once per shape and keeps
               the fastest whose output matches a float32 reference.
  head_pad     run attention at a larger head size: q, k, v get zero channels (which add exactly nothing to
               q.k), the softmax scale stays 1/sqrt(head_dim), and o_proj reads the padded output through
               zero weight columns. They are made padded, not copied: v by zero rows of its projection's
               weight, q and k by the RMSNorm + RoPE kernel writing each head padded (fused_norms). Kernels
               are tuned for some head sizes (64, 128) more than for XL's 72, and FlashAttention-4 pads 72 to
               80 inside with predicated loads; "auto" lets the attention measurement try head_dim rounded up
               to 16, 32 and 128 as well (FA4: to 16 only).
  fused_gelu   MLP fc1 + bias + tanh-GELU as one cuBLASLt GEMM with a GELU epilogue (CUDA): the 4D-wide
               hidden activation is written once instead of written, read and written again. Used only
               after a check on the device that the epilogue is the tanh GELU the model uses.
  fused_norms  Triton kernels (pixelflow/norm_kernels.py) for RMSNorm + RoPE of q and k and for LayerNorm +
               adaLN modulation: one read and one write per token, where inductor's kernels for them ran at a
               fifth and a third of memory speed. "auto": on for CUDA when Triton imports; used only after
               a check on the device that both compile, run and match their references.
  fused_residual  each block's gated MLP residual is added by the next LayerNorm + modulation kernel (the
               final layer's for the last block), which writes the sum and the normalised tokens: per block
               boundary one read of the residual stream and one kernel launch fewer than the add, then the
               LayerNorm. The Triton LayerNorm kernel then runs even with fused_norms off. "auto": as
               fused_norms; used only after its own check on the device.
  cuda_graphs  capture whole forwards as CUDA graphs, replayed per call: removes launch overhead where the
               work per launch is small (the coarse stages). "auto": forwards of at most graph_max_tokens tokens.

Guided sampling already skips the unconditional half where the guidance weight is 1 (stage 0 of
class-to-image; see PixelFlowPipeline._velocity_fn), and the sampling loop reads no device values.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations of the ops defined
# here, and before torch 2.5 it cannot read them as strings.
import contextlib
import importlib.util
import inspect
import math
import time
import warnings
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import norm_kernels
from .model.pixelflow_model import LAYER_NORM_EPS

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
ATTENTION_KERNELS = ("auto", "default", "cudnn", "flash", "efficient", "math", "flash_attn", "fa4")
_SDPA_KERNELS = ("cudnn", "flash", "efficient", "math")
_CUDA_KERNELS = ("cudnn", "flash", "efficient", "flash_attn", "fa4")
# The modules the kernels outside PyTorch come from: flash-attn 2 (`pip install flash-attn`) and FlashAttention-4
# (`pip install flash-attn-4`, the CuTe-DSL kernels; its Hopper forward takes any head size that is a multiple
# of 8, XL's 72 included). Both install under the name flash_attn, so each is told by its own submodule.
_KERNEL_MODULES = {"flash_attn": "flash_attn.flash_attn_interface", "fa4": "flash_attn.cute"}
ATTENTION_CHECK_ATOL = 3e-2  # an auto-picked kernel must match a float32 reference this closely (bf16 rounding)


@dataclass(frozen=True)
class FastOptions:
    """What the fast path does; every switch can be turned off. "auto" resolves with `resolve(device)`."""

    precision: str = "auto"            # "bf16", "fp16", "fp32", "keep" (the pipeline's); auto: bf16 on CUDA, else keep
    merge_qkv: bool | str = "auto"
    merge_adaln: bool | str = "auto"
    compile: bool | str = "auto"
    compile_backend: str = "inductor"  # "aot_eager" / "eager" check graph capture without code generation
    compile_mode: str | None = None    # e.g. "max-autotune-no-cudagraphs": slower to compile, fuses GEMM epilogues
    compile_mode_min_tokens: int = 0   # compile_mode only for forwards of at least this many tokens (rows x tokens
                                       # per image); smaller ones compile in the default mode, in seconds
    compile_dynamic: bool = False      # one compile for every batch size and stage (the demo's varying batches)
    attention: str = "auto"            # one of ATTENTION_KERNELS
    head_pad: int | str = "auto"       # 0: no padding; n: attend at head size n (>= head_dim); "auto": measured
    fused_gelu: bool | str = "auto"
    fused_norms: bool | str = "auto"   # on the CPU (True) the operators run the reference formulas
    fused_residual: bool | str = "auto"  # "auto": as fused_norms
    cuda_graphs: bool | str = "auto"   # True: every shape; "auto": forwards of at most graph_max_tokens tokens
    graph_max_tokens: int = 16384

    def resolve(self, device: torch.device | str) -> "FastOptions":
        """Concrete options for `device`: "auto" becomes on for CUDA and off (plain) elsewhere."""
        cuda = torch.device(device).type == "cuda"
        self._check()
        auto = lambda value, on: (on if value == "auto" else value)  # noqa: E731
        resolved = replace(
            self,
            precision=auto(self.precision, "bf16" if cuda else "keep"),
            merge_qkv=auto(self.merge_qkv, cuda),
            merge_adaln=auto(self.merge_adaln, cuda),
            compile=auto(self.compile, cuda),
            fused_gelu=auto(self.fused_gelu, cuda),
            fused_norms=auto(self.fused_norms, cuda and norm_kernels.available()),
            fused_residual=auto(self.fused_residual, auto(self.fused_norms, cuda and norm_kernels.available())),
            attention=auto(self.attention, "auto" if cuda else "default"),
            cuda_graphs=self.cuda_graphs if cuda else (False if self.cuda_graphs == "auto" else self.cuda_graphs),
        )
        if not cuda:
            if resolved.cuda_graphs:
                raise ValueError(f"cuda_graphs={self.cuda_graphs!r} needs a CUDA model, got device {device}; "
                                 "pass cuda_graphs=False")
            if resolved.attention in _CUDA_KERNELS:
                raise ValueError(f"attention={self.attention!r} needs a CUDA model, got device {device}; "
                                 "use 'default' or 'math'")
            if resolved.attention == "auto":
                resolved = replace(resolved, attention="default")
        if resolved.head_pad == "auto" and resolved.attention != "auto":
            resolved = replace(resolved, head_pad=0)  # only a measured choice pads by itself
        if resolved.attention in _KERNEL_MODULES:
            if resolved.precision == "fp32":
                raise ValueError(f"attention={resolved.attention!r} runs in bf16 or fp16 only, got precision='fp32' "
                                 "(use precision='bf16', or attention='auto')")
            if not kernel_installed(resolved.attention):
                package = {"flash_attn": "flash-attn", "fa4": "flash-attn-4"}[resolved.attention]
                raise ValueError(f"attention={resolved.attention!r} asked for, but {package} is not installed or "
                                 f"does not import (pip install {package}, or use attention='auto')")
        return resolved

    def _check(self) -> None:
        if self.precision not in ("auto", "keep", *PRECISIONS):
            raise ValueError(f"precision must be one of 'auto', 'keep', {', '.join(map(repr, PRECISIONS))}; "
                             f"got {self.precision!r}")
        for name in ("merge_qkv", "merge_adaln", "compile", "fused_gelu", "fused_norms", "fused_residual"):
            value = getattr(self, name)
            if value not in (True, False, "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
        if self.compile_dynamic not in (True, False):
            raise ValueError(f"compile_dynamic must be True or False, got {self.compile_dynamic!r}")
        if self.cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs must be True, False or 'auto', got {self.cuda_graphs!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.head_pad != "auto" and (isinstance(self.head_pad, bool) or not isinstance(self.head_pad, int)
                                        or self.head_pad < 0 or self.head_pad % 8 or self.head_pad > 256):
            raise ValueError(f"head_pad must be 'auto', 0 or a multiple of 8 up to 256, got {self.head_pad!r}")
        for name in ("graph_max_tokens", "compile_mode_min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.compile_mode_min_tokens and self.compile_mode is None:
            raise ValueError(f"compile_mode_min_tokens={self.compile_mode_min_tokens} picks the forwards that "
                             "compile in compile_mode, but compile_mode is None: set both, or neither")

    @property
    def is_plain(self) -> bool:
        """True when a resolved set of options changes nothing but the precision."""
        return not (self.merge_qkv or self.merge_adaln or self.compile or self.cuda_graphs or self.fused_gelu
                    or self.fused_norms or self.fused_residual or self.head_pad) and self.attention == "default"


def accelerate(pipe, options: FastOptions | None = None, **switches: Any):
    """Make `pipe` sample through a FastDenoiser; returns `pipe`.

    options: a FastOptions; switches: its fields to override, e.g. accelerate(pipe, compile=False).
    With the defaults this turns everything on for a CUDA model and is a no-op on the CPU (the plain model
    stays the denoiser). `plain(pipe)` undoes it.
    """
    names = {f.name for f in fields(FastOptions)}
    unknown = sorted(set(switches) - names)
    if unknown:
        raise ValueError(f"unknown fast-path switch(es) {unknown}; expected some of {sorted(names)}")
    requested = replace(options or FastOptions(), **switches)
    options = requested.resolve(pipe.device)
    dtype = pipe.autocast_dtype if options.precision == "keep" else PRECISIONS[options.precision]
    if dtype == torch.float32:
        dtype = None
    weight_dtype = dtype or pipe.model.proj_out_2.weight.dtype
    if options.attention in _KERNEL_MODULES and weight_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"attention={options.attention!r} runs in bf16 or fp16 only, but this pipeline would run "
                         f"it in {weight_dtype} (precision={options.precision!r}); use precision='bf16', or "
                         "attention='auto'")
    denoiser = pipe.model if options.is_plain else FastDenoiser(pipe.model, options, autocast_dtype=dtype,
                                                                 requested=requested)
    pipe.autocast_dtype, pipe.denoiser = dtype, denoiser  # only once the denoiser is built: a refusal changes nothing
    return pipe


def follow(pipe) -> None:
    """Build `pipe`'s fast path again, with the switches first given to `accelerate`, when it was built for
    another precision, model or device type than the pipeline's now (pipe.autocast_dtype, pipe.model or
    pipe.to(...) set after accelerate): it would otherwise sample at the old precision, with the old weights,
    or fail. The pipeline calls this at every stage."""
    denoiser = pipe.denoiser
    dtype = None if pipe.autocast_dtype == torch.float32 else pipe.autocast_dtype
    moved = denoiser.device.type != pipe.device.type  # CUDA-only switches were resolved for the old device
    if denoiser.autocast_dtype != dtype or denoiser.model is not pipe.model or moved:
        accelerate(pipe, replace(denoiser.requested, precision="keep"))


def plain(pipe):
    """Undo `accelerate`: the sampling loop calls the plain model again (the precision is left as it is)."""
    pipe.denoiser = pipe.model
    return pipe


# ---------------------------------------------------------------------------------------------- the block
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, as pixelflow.model.attention.RMSNorm computes it."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str,
            mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """q (B, Lq, H, d), k/v (B, Lk, H, d) -> (B, Lq, H, d). kernel "flash_attn" calls flash-attn 2, "fa4"
    FlashAttention-4; any other goes through scaled_dot_product_attention (the SDPA backend is chosen around
    the call). scale: the softmax scale, 1/sqrt(d) when None."""
    if kernel == "fa4" and mask is None:
        return fa4_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    if kernel == "flash_attn" and mask is None:
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v, softmax_scale=scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale)
    return out.transpose(1, 2)


def pad_heads(t: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, d) -> (..., H, size): zero channels after each head's d."""
    return F.pad(t, (0, size - t.shape[-1]))


class BlockSpec(NamedTuple):
    """What every block of one forward shares besides its weights; a compiled block specialises on it."""

    heads: int
    head_dim: int
    eps: float             # the RMSNorms' epsilon (q and k, norm2, norm3)
    kernel: str            # attention kernel (see _attend)
    pad: int               # attention head size with zero channels added, or 0 for none
    fused_gelu: bool
    fused_norms: bool
    fused_residual: bool


def _rms_rope(x: torch.Tensor, weight: torch.Tensor, rope: torch.Tensor, spec: BlockSpec,
              size: int = 0) -> torch.Tensor:
    """RMSNorm then RoPE: (B, N, H*d) -> (B, N, H, d), or (B, N, H, size) with zeros after each head's d;
    one Triton kernel with fused_norms (padded as it writes)."""
    if spec.fused_norms:
        if size:
            return norm_kernels.rms_rope_padded(x, weight, rope, spec.heads, spec.eps, size)
        return norm_kernels.rms_rope(x, weight, rope, spec.heads, spec.eps)
    if size:
        return norm_kernels.rms_rope_padded_reference(x, weight, rope, spec.heads, spec.eps, size)
    return norm_kernels.rms_rope_reference(x, weight, rope, spec.heads, spec.eps)


def _pad_rows(t: torch.Tensor | None, heads: int, size: int) -> torch.Tensor | None:
    """A projection's weight (H*d, D) or bias (H*d,) with zero rows after each head's d: (H*size, ...)."""
    if t is None:
        return None
    per_head = t.unflatten(0, (heads, -1))
    return F.pad(per_head, (0, 0) * (t.ndim - 1) + (0, size - per_head.shape[1])).flatten(0, 1)


def _self_attention(h: torch.Tensor, rope: torch.Tensor, w: dict, spec: BlockSpec) -> torch.Tensor:
    heads, head_dim, kernel, pad = spec.heads, spec.head_dim, spec.kernel, spec.pad
    if not pad:
        if "qkv_w" in w:
            q, k, v = F.linear(h, w["qkv_w"], w["qkv_b"]).chunk(3, dim=-1)
        else:
            q, k, v = (F.linear(h, w[f"{n}_w"], w[f"{n}_b"]) for n in "qkv")
        q = _rms_rope(q, w["q_norm"], rope, spec)
        k = _rms_rope(k, w["k_norm"], rope, spec)
        v = v.unflatten(-1, (heads, head_dim))
        return F.linear(_attend(q, k, v, kernel).flatten(-2), w["o_w"], w["o_b"])
    # Padded heads, made padded where they are made instead of copied: v by zero rows of its projection, q and
    # k by the norm kernel writing each head at `pad` channels. Zero channels add nothing to q.k and come out
    # of attention as zeros, which the zero columns of the padded o_proj weight ignore. The weights are padded
    # here, per call: a few MB against the activations' GBs.
    inner = heads * head_dim
    if "qkv_w" in w:
        qk_w, v_w = w["qkv_w"].split((2 * inner, inner))
        qk_b, v_b = (None, None) if w["qkv_b"] is None else w["qkv_b"].split((2 * inner, inner))
        qkv_w = torch.cat([qk_w, _pad_rows(v_w, heads, pad)])
        qkv_b = None if qk_b is None else torch.cat([qk_b, _pad_rows(v_b, heads, pad)])
        q, k, v = F.linear(h, qkv_w, qkv_b).split((inner, inner, heads * pad), dim=-1)
    else:
        q, k = F.linear(h, w["q_w"], w["q_b"]), F.linear(h, w["k_w"], w["k_b"])
        v = F.linear(h, _pad_rows(w["v_w"], heads, pad), _pad_rows(w["v_b"], heads, pad))
    q = _rms_rope(q, w["q_norm"], rope, spec, pad)
    k = _rms_rope(k, w["k_norm"], rope, spec, pad)
    out = _attend(q, k, v.unflatten(-1, (heads, pad)), kernel, scale=head_dim ** -0.5)
    o_w = pad_heads(w["o_w"].unflatten(-1, (heads, head_dim)), pad).flatten(-2)
    return F.linear(out.flatten(-2), o_w, w["o_b"])


def _cross_attention(h: torch.Tensor, rope: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None,
                     w: dict, spec: BlockSpec) -> torch.Tensor:
    """Queries from the image (rotated), keys and values from the text (not rotated), as the release."""
    heads, head_dim, eps = spec.heads, spec.head_dim, spec.eps
    q = F.linear(h, w["xq_w"], w["xq_b"])
    if "xkv_w" in w:
        k, v = F.linear(context, w["xkv_w"], w["xkv_b"]).chunk(2, dim=-1)
    else:
        k, v = F.linear(context, w["xk_w"], w["xk_b"]), F.linear(context, w["xv_w"], w["xv_b"])
    q = _rms_rope(q, w["xq_norm"], rope, spec)
    k = _rms(k, w["xk_norm"], eps).unflatten(-1, (heads, head_dim))
    out = _attend(q, k, v.unflatten(-1, (heads, head_dim)), "sdpa", mask)
    return F.linear(out.flatten(-2), w["xo_w"], w["xo_b"])


def _mlp(h: torch.Tensor, w: dict, fused_gelu: bool) -> torch.Tensor:
    if fused_gelu and w["fc1_b"] is not None:
        hidden = linear_gelu_tanh(h, w["fc1_w"], w["fc1_b"])
    else:
        hidden = F.gelu(F.linear(h, w["fc1_w"], w["fc1_b"]), approximate="tanh")
    return F.linear(hidden, w["fc2_w"], w["fc2_b"])


def block_forward(x: torch.Tensor, mod: torch.Tensor, rope: torch.Tensor, w: dict, spec: BlockSpec,
                  context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                  pending: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One PixelFlowBlock (pixelflow/model/pixelflow_model.py) on dense tokens, the same operations in the same
    order, from a dict of (possibly merged) weights. Compiled as one region and reused by every block.

    x: (B, N, D); mod: (B, 6, D) float32 adaLN outputs (shift1, scale1, gate1, shift2, scale2, gate2);
    rope: (N, head_dim, 2) float32; spec: the settings all blocks share (BlockSpec). pending: the previous block's
    MLP output and gate2, not yet added to x (fused_residual). Returns (x, None), or with fused_residual (x, (mlp
    output, gate2)): this block's residual, left for the next block's LayerNorm kernel (or the final layer's) to
    add.
    """
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
    if pending is not None:
        x, h = norm_kernels.add_layer_norm_modulate(x, pending[0], pending[1], shift1, scale1, LAYER_NORM_EPS)
    elif spec.fused_norms:
        h = norm_kernels.layer_norm_modulate(x, shift1, scale1, LAYER_NORM_EPS)
    else:
        h = F.layer_norm(x, (x.shape[-1],), eps=LAYER_NORM_EPS)
        h = torch.addcmul(shift1[:, None], h, 1 + scale1[:, None]).to(x.dtype)
    h = _self_attention(h, rope, w, spec)
    x = x + (h * gate1[:, None]).to(x.dtype)
    if context is not None:
        x = x + _cross_attention(_rms(x, w["norm2"], spec.eps), rope, context, context_mask, w, spec)
    h = torch.addcmul(shift2[:, None], _rms(x, w["norm3"], spec.eps), 1 + scale2[:, None]).to(x.dtype)
    h = _mlp(h, w, spec.fused_gelu)
    if spec.fused_residual:
        return x, (h, gate2)
    return x + (h * gate2[:, None]).to(x.dtype), None


def block_forward_large(*args, **kwargs):
    """block_forward, for forwards compiled in compile_mode when compile_mode_min_tokens splits the shapes."""
    return block_forward(*args, **kwargs)


_IMPORTABLE: dict[str, bool] = {}


def kernel_installed(kernel: str) -> bool:
    """Whether the package an attention kernel outside PyTorch comes from imports and has flash_attn_func
    (True for SDPA's kernels). Cached: FA4's import loads its compiler, seconds."""
    module = _KERNEL_MODULES.get(kernel)
    if module is None:
        return True
    if kernel not in _IMPORTABLE:
        try:
            _IMPORTABLE[kernel] = hasattr(importlib.import_module(module), "flash_attn_func")
        except Exception:  # noqa: BLE001 - missing or broken (flash-attn 2.8 ships an older flash_attn/cute
            _IMPORTABLE[kernel] = False  # that fails to import under a current cutlass-dsl): not a candidate
    return _IMPORTABLE[kernel]


# FlashAttention-4's forward tiling per head size, as keyword arguments of its
# flash_attn.cute.interface._flash_attn_fwd (tile_mn=(m, n), mma_pv_is_rs, intra_wg_overlap). Head sizes not named
# here go to its public flash_attn_func with the library's own choice (at XL's head size 72: 192 x 144 tiles). On
# an H100 (2026-11-27, stop 18) 192 x 128 ran the 256 px self-attention 1 to 7 % faster than that (5.81 against
# 6.22 ms, 5.88 against 5.95 on another machine), and 5.26 ms with the heads given padded to 80 (head_pad), the
# size FA4 pads 72 to inside. benchmarks/gpu_check.py times FA4_TILINGS at the 256 px shape; the tiling changes
# speed, not the result beyond the order of sums.
_FA4_192_128 = {"tile_mn": (192, 128), "mma_pv_is_rs": False, "intra_wg_overlap": True}
FA4_CONFIG: dict[int, dict[str, Any]] = {72: _FA4_192_128, 80: _FA4_192_128}
FA4_TILINGS = tuple({"tile_mn": tile, "mma_pv_is_rs": rs, "intra_wg_overlap": overlap} for tile, rs, overlap in (
    ((192, 128), False, True), ((128, 128), True, True), ((128, 128), False, True), ((128, 160), False, True),
    ((192, 160), False, True), ((128, 192), False, True), ((192, 96), False, True), ((192, 112), False, True),
    ((192, 176), False, True), ((192, 192), False, True), ((192, 128), False, False)))
_FA4_TILED: list = []  # [(_flash_attn_fwd or None, names of its parameters or None for any)], found on first use
_FA4_UNTILED_WARNED: set = set()


def _fa4_tiled_forward(config: dict):
    """FA4's _flash_attn_fwd if the installed FlashAttention-4 takes the tiling arguments of `config`, else None
    (with a warning, once per set of arguments): that private function is what the 4.0 betas expose for it."""
    if not _FA4_TILED:
        fwd = names = None
        try:
            from flash_attn.cute.interface import _flash_attn_fwd as fwd
            params = inspect.signature(fwd).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                names = frozenset(params)
        except Exception:  # noqa: BLE001 - missing, or an import that fails: the public function it is
            fwd = None
        _FA4_TILED.append((fwd, names))
    fwd, names = _FA4_TILED[0]
    if fwd is not None and (names is None or set(config) <= names):
        return fwd
    key = frozenset(config)
    if key not in _FA4_UNTILED_WARNED:
        _FA4_UNTILED_WARNED.add(key)
        warnings.warn(f"this FlashAttention-4 takes no tiling arguments {sorted(config)}: fast.FA4_CONFIG is not "
                      "used, the library picks its own tiles", stacklevel=3)
    return None


@torch.library.custom_op("pixelflow::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """FlashAttention-4's forward: q (B, Lq, H, d), k/v (B, Lk, H, d) -> (B, Lq, H, d), softmax scale `scale`,
    tiled as FA4_CONFIG says for head size d. An opaque operator: torch.compile calls it as it is instead of
    tracing into the kernel library, and its just-in-time compilation happens on the first call (before any CUDA
    graph capture: see FastDenoiser)."""
    config = FA4_CONFIG.get(q.shape[-1])
    tiled = _fa4_tiled_forward(config) if config else None
    if tiled is not None:
        out = tiled(q, k, v, softmax_scale=scale, **config)
    else:
        from flash_attn.cute import flash_attn_func
        out = flash_attn_func(q, k, v, softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out  # (out, lse) in the 4.0 betas
    return out.contiguous()  # as the fake promises (the kernel's output already is: no copy)


@fa4_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


# ---------------------------------------------------------------------------------------------- fused GELU
@torch.library.custom_op("pixelflow::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) for x (..., K). On CUDA, once `gelu_epilogue_is_tanh` has passed for the
    device and dtype, one GEMM with a bias + GELU epilogue; otherwise the two steps. An opaque operator, so
    that torch.compile keeps the epilogue instead of splitting the GEMM from the GELU."""
    flat = x.reshape(-1, x.shape[-1])
    weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # x's dtype throughout, as the fake says, compiled or not
        if _EPILOGUE_IS_TANH.get((x.device, x.dtype)) and flat.shape[0] > 1:
            out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
        else:
            out = F.gelu(F.linear(flat, weight, bias), approximate="tanh")
    return out.reshape(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_EPILOGUE_IS_TANH: dict[tuple, bool] = {}
# GELU at points where the tanh form and the erf form differ by ~10 % (x <= -2.5): one bf16 ulp is 0.4 %.
_GELU_PROBES = (-4.0, -3.5, -3.0, -2.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5)


def _canonical(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def gelu_epilogue_output(device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(probes, torch._addmm_activation(use_gelu=True) at the probes) in float32, computed in `dtype`."""
    device = _canonical(device)
    probes = torch.tensor(_GELU_PROBES, dtype=dtype, device=device)
    # Pre-activations equal to the probes exactly: x = 1 (M x 8), weight = 0, bias = probes.
    x = torch.ones(64, 8, dtype=dtype, device=device)
    w = torch.zeros(probes.numel(), 8, dtype=dtype, device=device)
    with torch.autocast(device.type, enabled=False):
        out = torch._addmm_activation(probes, x, w.t(), use_gelu=True)
    return probes.float(), out[0].float()


def gelu_epilogue_is_tanh(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether torch._addmm_activation(use_gelu=True) computes the tanh GELU on `device` in `dtype`.

    cuBLASLt's GELU epilogue is the tanh approximation the model uses, but PyTorch's CPU kernel applies the
    erf GELU, and a library may differ: the fused path is used only where this check passed. The tolerance
    (1 % of the value) is far tighter than the erf/tanh gap at x <= -2.5; an epilogue with a much rougher tanh
    would be refused too, which only costs speed. Cached; syncs.
    """
    key = (_canonical(device), dtype)
    if key not in _EPILOGUE_IS_TANH:
        try:
            probes, out = gelu_epilogue_output(device, dtype)
        except RuntimeError:  # no such kernel for this device or dtype: the unfused path it is
            _EPILOGUE_IS_TANH[key] = False
            return False
        ref = F.gelu(probes, approximate="tanh")
        tol = 1e-2 * ref.abs() + 1e-6
        _EPILOGUE_IS_TANH[key] = bool(((out - ref).abs() <= tol).all())
    return _EPILOGUE_IS_TANH[key]


# ---------------------------------------------------------------------------------------------- attention choice
def _sdpa_backends(kernel: str) -> list:
    from torch.nn.attention import SDPBackend
    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[kernel]


def sdpa_context(kernel: str, strict: bool = False):
    """Context that makes scaled_dot_product_attention use `kernel` first.

    Not strict: the other exact kernels stay allowed after it (a shape or mask it cannot take falls back to
    them, as cross-attention with a text mask does). Strict: `kernel` alone.
    """
    if kernel not in _SDPA_KERNELS:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel
    first = _sdpa_backends(kernel)
    if strict:
        return sdpa_kernel([first])
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        # Older PyTorch (< 2.6) has no priority order: `kernel`, with math left for what it cannot take.
        return sdpa_kernel([first, _sdpa_backends("math")]) if kernel != "math" else contextlib.nullcontext()
    rest = [_sdpa_backends(k) for k in ("flash", "efficient", "cudnn", "math") if k != kernel]
    return sdpa_kernel([first, *rest], set_priority=True)


def median_seconds(fn, device: torch.device | str, reps: int = 5, warmup: int = 2, graph: bool = False) -> float:
    """Median seconds of fn(): CUDA events on a CUDA device, the wall clock elsewhere (tests on the CPU).

    graph (CUDA): time fn captured in a CUDA graph, without the host's launch overhead, as a forward that
    replays a graph pays it; if fn cannot be captured, fn itself, as such a forward would run it.
    """
    with on_device(device):
        return _median_seconds(fn, device, reps, warmup, graph)


def on_device(device: torch.device | str):
    """Make `device` the current CUDA device (its streams, graphs and events); nothing elsewhere."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _median_seconds(fn, device, reps: int, warmup: int, graph: bool) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if graph and torch.device(device).type == "cuda":
        captured = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(captured, stream=torch.cuda.Stream(device)):
                fn()
            fn = captured.replay
        except Exception:  # noqa: BLE001 - not capturable: timed eagerly below
            pass
    if torch.device(device).type != "cuda":
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def head_sizes(head_dim: int, head_pad: int | str) -> tuple[int, ...]:
    """Head sizes to run attention at (0: as is): head_pad "auto" tries head_dim rounded up to a multiple of
    16 and 32, and 128 (what kernels are most tuned for) when larger; an int is that size alone."""
    if head_pad != "auto":
        if head_pad and head_pad < head_dim:
            raise ValueError(f"head_pad {head_pad} is smaller than the model's attention_head_dim {head_dim}")
        return (0,) if head_pad in (0, head_dim) else (head_pad,)
    sizes = [0] + [-(-head_dim // m) * m for m in (16, 32)] + ([128] if head_dim < 128 else [])
    return tuple(dict.fromkeys(s for s in sizes if s != head_dim))


def attention_label(kernel: str, pad: int) -> str:
    return f"{kernel}@{pad}" if pad else kernel


def measure_attention(batch: int, seq: int, heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device | str, kernels: tuple[str, ...] | None = None,
                      pads: tuple[int, ...] = (0,), out_dim: int | None = None,
                      graphed: bool = False, prepadded: bool = True) -> dict[str, dict]:
    """Time each exact self-attention kernel on random (batch, seq, heads, head_dim) inputs (CUDA), at each
    head size in `pads` (0: unpadded).

    out_dim: also time what padding costs around the kernel, for every candidate alike: what the forward pays.
    That is the output projection to out_dim, whose input widens with the pad, and, as _self_attention pads
    them per call, the padded o_proj and qkv weights (the qkv projection's few extra columns, (pad - d) / 3d
    more, are not timed).
    prepadded: padded candidates start from q, k, v made padded, as the fast path makes them with fused_norms
    (see _self_attention); False: v made padded, q and k padded by copies in the timed call (the norm's output
    copied into padded heads, as without fused_norms).
    graphed: time inside CUDA graphs, for shapes the fast path replays as graphs (see median_seconds).
    Returns {label: {"kernel", "pad", "seconds": median time or None, "max_err": vs a float32 reference on the
    first image, "error": why it could not run, "contiguous": whether the (B, L, H, d) output is laid out so
    (False: flattening the heads for o_proj copies it)}}; label is attention_label(kernel, pad).
    """
    if kernels is None:
        kernels = tuple(k for k in ("cudnn", "flash", "efficient", "flash_attn", "fa4") if kernel_installed(k))
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    no_autocast = torch.autocast(torch.device(device).type, enabled=False)  # a caller's autocast must not recast
    with no_autocast, sdpa_context("math", strict=True):
        ref = _attend(q[:1].float(), k[:1].float(), v[:1].float(), "sdpa")
    inner = heads * head_dim
    o_w = qkv_w = None
    if out_dim is not None:
        o_w = torch.randn(out_dim, inner, device=device, dtype=dtype, generator=gen) * inner ** -0.5
        qkv_w = torch.randn(3 * inner, out_dim, device=device, dtype=dtype, generator=gen)
    results = {}
    for pad in pads:
        scale = head_dim ** -0.5 if pad else None
        padded = tuple(pad_heads(t, pad) for t in (q, k, v)) if pad else None

        def attend(kernel: str, pad: int = pad, scale: float | None = scale, padded=padded) -> torch.Tensor:
            if not pad:
                return _attend(q, k, v, kernel)
            if prepadded:
                return _attend(*padded, kernel, scale=scale)
            return _attend(pad_heads(q, pad), pad_heads(k, pad), padded[2], kernel, scale=scale)

        def attend_project(kernel: str, pad: int = pad, attend=attend) -> torch.Tensor:
            if not pad:
                return F.linear(attend(kernel).flatten(-2), o_w)
            qk_w, v_w = qkv_w.split((2 * inner, inner))
            torch.cat([qk_w, _pad_rows(v_w, heads, pad)])  # as _self_attention builds it, per call
            w = pad_heads(o_w.unflatten(-1, (heads, head_dim)), pad).flatten(-2)
            return F.linear(attend(kernel).flatten(-2), w)

        for kernel in kernels:
            if kernel == "fa4" and pad and 0 in pads and pad != -(-head_dim // 16) * 16:
                # It takes any head size, but pads it to a multiple of 16 inside, with predicated loads: only that
                # size, given padded, can be faster (each size costs a just-in-time compile).
                continue
            label = attention_label(kernel, pad)
            call = (lambda: attend(kernel)) if o_w is None else (lambda: attend_project(kernel))  # noqa: E731
            try:
                with no_autocast, sdpa_context(kernel, strict=True):
                    full = attend(kernel)
                    err = (full[:1, ..., :head_dim].float() - ref).abs().max().item()
                    seconds = median_seconds(call, device, graph=graphed) if err <= ATTENTION_CHECK_ATOL else None
                results[label] = {"kernel": kernel, "pad": pad, "seconds": seconds, "max_err": err,
                                  "error": None if seconds else "inexact",
                                  "contiguous": full.is_contiguous()}  # False: o_proj's flatten copies it
            except Exception as e:  # a kernel that cannot take this shape/dtype/device is not a candidate
                results[label] = {"kernel": kernel, "pad": pad, "seconds": None, "max_err": None,
                                  "error": f"{type(e).__name__}: {str(e)[:120]}", "contiguous": None}
    return results


def pick_attention(batch: int, seq: int, heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device | str, pads: tuple[int, ...] = (0,),
                   out_dim: int | None = None, graphed: bool = False, prepadded: bool = True) -> tuple[str, int]:
    """The fastest exact self-attention (kernel, head size or 0) for this shape (("default", 0) if none could
    be timed). out_dim: time the candidates with their padding and output projection (see measure_attention),
    which is what decides between head sizes."""
    results = measure_attention(batch, seq, heads, head_dim, dtype, device, pads=pads, out_dim=out_dim,
                                graphed=graphed, prepadded=prepadded)
    timed = {k: r["seconds"] for k, r in results.items() if r["seconds"]}
    if not timed:
        return "default", 0
    best = results[min(timed, key=timed.get)]
    return best["kernel"], best["pad"]


# ---------------------------------------------------------------------------------------------- the denoiser
class FastDenoiser:
    """Calls like the model (dense inputs): v = denoiser(x, timestep, class_labels=... or
    encoder_hidden_states=..., encoder_attention_mask=...). Packed inputs (grid_sizes) go to the plain model.

    Weights are read from the model when first needed and again whenever a parameter changes: in place (its
    version counter moves, as optimizer steps and load_state_dict do: the copies are updated in place, so
    captured graphs stay valid) or replaced (load_state_dict(assign=True), .to(dtype), a move to another GPU: the
    copies, graphs and kernel choices are rebuilt). A pipeline moved between the CPU and CUDA builds its fast
    path again from the switches given to `accelerate`. Call `refresh()` after changing weights through `.data`.
    """

    follows_pipeline = True  # the pipeline calls fast.follow(pipe) to rebuild it after the pipeline changes

    def __init__(self, model: torch.nn.Module, options: FastOptions, autocast_dtype: torch.dtype | None = None,
                 requested: FastOptions | None = None):
        if options.precision == "auto" or "auto" in (options.merge_qkv, options.merge_adaln, options.compile,
                                                     options.fused_gelu, options.fused_norms,
                                                     options.fused_residual):
            raise ValueError("FastDenoiser needs resolved options: pass options.resolve(device)")
        self.model = model
        self.options = options
        self.requested = requested or options  # before "auto" was resolved: to build it again on another device
        self.autocast_dtype = autocast_dtype
        self._setup()

    def _setup(self) -> None:
        """Everything that depends on the model's device and weight dtype."""
        model, options, autocast_dtype = self.model, self.options, self.autocast_dtype
        self.device = model.proj_out_2.weight.device
        self.weight_dtype = autocast_dtype if autocast_dtype is not None else model.proj_out_2.weight.dtype
        if options.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA model, got {self.device}")
        self.graph_max_tokens = {True: math.inf, "auto": options.graph_max_tokens, False: 0}[options.cuda_graphs]
        self.attention_choice: dict[tuple, str] = {}  # (batch, tokens) -> attention_label, for reports
        self._attention: dict[tuple, tuple[str, int]] = {}
        self.head_sizes = head_sizes(model.attention_head_dim, options.head_pad)
        self.fused_gelu = bool(options.fused_gelu)
        if self.fused_gelu and self.device.type == "cuda" and not gelu_epilogue_is_tanh(self.device,
                                                                                       self.weight_dtype):
            warnings.warn(f"the GEMM GELU epilogue on {self.device} ({self.weight_dtype}) is not the tanh GELU "
                          "the model uses: fused_gelu runs the GEMM and the GELU separately")
        self.fused_norms = bool(options.fused_norms)
        if self.fused_norms and (self.device.type == "cuda" or norm_kernels.INTERPRET):
            widths = (self.device, self.weight_dtype, model.hidden_size, model.num_attention_heads,
                      model.attention_head_dim)
            works = norm_kernels.works(*widths)
            failing = [s for s in self.head_sizes if works and s and not norm_kernels.works(*widths, pads=(s,))]
            if not works or (failing and options.head_pad != "auto"):
                warnings.warn(f"the Triton normalisation kernels do not compile, run or match their references on "
                              f"{self.device} ({self.weight_dtype}"
                              + (f", padded to head size {failing[0]}" if failing else "") + "): fused_norms is off")
                self.fused_norms = False
            elif failing:  # a measured choice: attention is not tried at those sizes
                warnings.warn(f"the padded RMSNorm + RoPE kernel does not compile, run or match its reference at "
                              f"head sizes {failing} on {self.device} ({self.weight_dtype}): attention is not tried "
                              f"at those sizes")
                self.head_sizes = tuple(s for s in self.head_sizes if s not in failing)
        self.fused_residual = bool(options.fused_residual)
        if self.fused_residual and (self.device.type == "cuda" or norm_kernels.INTERPRET) and not norm_kernels.works(
                self.device, self.weight_dtype, model.hidden_size, model.num_attention_heads,
                model.attention_head_dim, ops=("add_layer_norm_modulate",)):
            warnings.warn(f"the Triton residual + LayerNorm kernel does not compile, run or match its reference on "
                          f"{self.device} ({self.weight_dtype}): fused_residual is off")
            self.fused_residual = False
        self._weights: dict | None = None
        self._state: list | None = None  # the parameters the copies were made from (see _param_state)
        self._graphs: dict[tuple, Any] = {}
        self._graph_pool = None
        self._compiled: dict[tuple, Any] = {}  # input shapes -> the block function used for them
        self._block = self._block_large = block_forward
        if options.compile:
            _raise_recompile_limit(128)  # two regions per shape with fused_residual
            # Static shapes by default; compile_dynamic marks the batch and token dims dynamic (see _forward).
            compile = partial(torch.compile, dynamic=None if options.compile_dynamic else False, fullgraph=True,
                              backend=options.compile_backend)
            split = options.compile_mode is not None and options.compile_mode_min_tokens > 0
            self._block = compile(block_forward, mode=None if split else options.compile_mode)
            # Its own function (code object), so that the two modes' compiled code is cached apart.
            self._block_large = compile(block_forward_large, mode=options.compile_mode) if split else self._block

    # ------------------------------------------------------------------ weights
    def _param_state(self) -> list:
        """Per parameter: which tensor, in which dtype, on which device, at which version."""
        return [(p.data_ptr(), p.dtype, p.device, p._version) for p in self.model.parameters()]

    @torch.inference_mode(False)  # copies made in a first call under inference_mode must stay writable later
    @torch.no_grad()              # (inference_mode(False) alone turns autograd back on)
    def _check_weights(self) -> None:
        state = self._param_state()
        if self._weights is not None and state == self._state:
            return
        if self._state is not None and [s[:3] for s in state] != [s[:3] for s in self._state]:
            # Parameters replaced (load_state_dict(assign=True)), moved or cast: rebuild the copies, not write
            # into tensors that may be the caller's now; graphs and kernel choices were made for the old ones.
            if {s[1:3] for s in state} != {s[1:3] for s in self._state}:
                self._setup()  # a new device or dtype: kernel checks and compiled regions again
            self._weights, self._graphs, self._graph_pool, self._attention = None, {}, None, {}
            self.attention_choice = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's weights into the (merged, cast) copies, in place: captured graphs stay valid.
        A copy that is the parameter itself (nothing merged or cast) is not written to."""
        fresh = self._build_weights()
        if self._weights is None:
            self._weights = fresh
        else:
            for old, new in zip(_tensors(self._weights), _tensors(fresh)):
                if old.data_ptr() != new.data_ptr():
                    old.copy_(new)
        self._state = self._param_state()

    def _build_weights(self) -> dict:
        m, o = self.model, self.options

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(self.weight_dtype)

        def cat(*ts: torch.Tensor | None) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat([cast(t) for t in ts])

        blocks = []
        for block in m.transformer_blocks:
            a = block.attn1
            w = {"q_norm": a.q_norm.weight.detach(), "k_norm": a.k_norm.weight.detach(),
                 "o_w": cast(a.o_proj.weight), "o_b": cast(a.o_proj.bias), "norm3": block.norm3.weight.detach(),
                 "fc1_w": cast(block.mlp.fc1.weight), "fc1_b": cast(block.mlp.fc1.bias),
                 "fc2_w": cast(block.mlp.fc2.weight), "fc2_b": cast(block.mlp.fc2.bias)}
            if o.merge_qkv:
                w["qkv_w"] = cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
                w["qkv_b"] = cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
            else:
                for n in "qkv":
                    proj = getattr(a, f"{n}_proj")
                    w[f"{n}_w"], w[f"{n}_b"] = cast(proj.weight), cast(proj.bias)
            if hasattr(block, "attn2"):
                x = block.attn2
                w.update({"norm2": block.norm2.weight.detach(), "xq_w": cast(x.q_proj.weight),
                          "xq_b": cast(x.q_proj.bias), "xq_norm": x.q_norm.weight.detach(),
                          "xk_norm": x.k_norm.weight.detach(), "xo_w": cast(x.o_proj.weight),
                          "xo_b": cast(x.o_proj.bias)})
                if o.merge_qkv:
                    w["xkv_w"], w["xkv_b"] = cat(x.k_proj.weight, x.v_proj.weight), cat(x.k_proj.bias, x.v_proj.bias)
                else:
                    w.update({"xk_w": cast(x.k_proj.weight), "xk_b": cast(x.k_proj.bias),
                              "xv_w": cast(x.v_proj.weight), "xv_b": cast(x.v_proj.bias)})
            if not o.merge_adaln:
                w["ada_w"], w["ada_b"] = cast(block.norm1.linear.weight), cast(block.norm1.linear.bias)
            blocks.append(w)
        weights = {"blocks": blocks}
        if o.merge_adaln:
            lins = [b.norm1.linear for b in m.transformer_blocks]
            weights["ada_w"] = cat(*[l.weight for l in lins])
            weights["ada_b"] = cat(*[l.bias for l in lins])
        return weights

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def __call__(self, hidden_states: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                 encoder_hidden_states: torch.Tensor | None = None,
                 encoder_attention_mask: torch.Tensor | None = None,
                 grid_sizes: list[int] | None = None) -> torch.Tensor:
        m, x = self.model, hidden_states
        if grid_sizes is not None:
            return m(x, timestep, class_labels, encoder_hidden_states, encoder_attention_mask, grid_sizes)
        if x.ndim != 4 or x.shape[1] != m.in_channels or x.shape[2] % m.patch_size or x.shape[3] % m.patch_size:
            raise ValueError(f"expected hidden_states (B, {m.in_channels}, H, W) with H and W multiples of "
                             f"patch_size {m.patch_size}, got {tuple(x.shape)}")
        m.check_text_inputs(encoder_hidden_states, encoder_attention_mask)
        self._check_weights()
        b = x.shape[0]
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=x.device)
        inputs = (x, timestep, class_labels, encoder_hidden_states, encoder_attention_mask)
        tokens = b * (x.shape[2] // m.patch_size) * (x.shape[3] // m.patch_size)
        kernel, _ = self._attention_kernel(b, tokens // b)  # measured once per shape, outside autocast
        with on_device(self.device), self._precision(), sdpa_context(kernel):
            if tokens <= self.graph_max_tokens:
                return self._replay(inputs)
            return self._forward(*inputs)

    def _precision(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        # No weight-cast cache: it would outlive a captured graph; the matmul weights are cast already.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _attention_kernel(self, batch: int, seq: int) -> tuple[str, int]:
        """(kernel, head size or 0) for self-attention over `batch` images of `seq` tokens."""
        key = (batch, seq)
        if key not in self._attention:
            kernel, pad = self.options.attention, self.head_sizes[0]
            if kernel == "auto":
                m = self.model
                kernel, pad = pick_attention(batch, seq, m.num_attention_heads, m.attention_head_dim,
                                             self.weight_dtype, self.device, pads=self.head_sizes,
                                             out_dim=m.hidden_size if len(self.head_sizes) > 1 else None,
                                             graphed=batch * seq <= self.graph_max_tokens,
                                             prepadded=self.fused_norms)
            self._attention[key] = (kernel, pad)
            self.attention_choice[key] = attention_label(kernel, pad)
        return self._attention[key]

    def _forward(self, x, timestep, class_labels, context, context_mask) -> torch.Tensor:
        """The model's dense forward (PixelFlowModel.forward) with the blocks run by block_forward."""
        m, w = self.model, self._weights
        b, _, height, width = x.shape
        gh, gw = height // m.patch_size, width // m.patch_size
        tokens = m.patch_embed(m.patchify(x))
        grid_side = torch.full((1,), gw, device=x.device)  # as the model (and the release): the token-grid width
        c = m.conditioning(timestep, grid_side, class_labels, b, tokens.dtype)
        mask = m._text_mask(context_mask, x.dtype)
        rope = m.rope_table(gh, gw, x.device)
        kernel, pad = self._attention_kernel(b, gh * gw)
        spec = BlockSpec(m.num_attention_heads, m.attention_head_dim, m.transformer_blocks[0].norm3.eps, kernel, pad,
                         self.fused_gelu, self.fused_norms, self.fused_residual)
        silu_c = F.silu(c)
        if "ada_w" in w:  # merged: (B, depth * 6D) -> (B, depth, 6, D)
            mods = F.linear(silu_c, w["ada_w"], w["ada_b"]).float().unflatten(-1, (len(w["blocks"]), 6, -1)).unbind(1)
        else:
            mods = [F.linear(silu_c, bw["ada_w"], bw["ada_b"]).float().unflatten(-1, (6, -1)) for bw in w["blocks"]]
        if self.options.compile_dynamic:
            for t in (tokens, *mods, rope) + tuple(t for t in (context, mask) if t is not None):
                torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(tokens, 1)
        pending, blocks = None, {}  # with fused_residual the first block (nothing pending) is its own shape
        for mod, bw in zip(mods, w["blocks"]):
            if (pending is None) not in blocks:
                blocks[pending is None] = self._block_for(tokens, mod, rope, bw, spec, context, mask, pending)
            tokens, pending = blocks[pending is None](tokens, mod, rope, bw, spec, context, mask, pending)
        if pending is None:
            return m.unpatchify(m.final_layer(tokens, c), gh, gw)
        # The last block's residual, added by the final layer's LayerNorm + modulation (as m.final_layer).
        shift, scale = m.proj_out_1(silu_c).float().chunk(2, dim=-1)
        _, h = norm_kernels.add_layer_norm_modulate(tokens, *pending, shift, scale, LAYER_NORM_EPS)
        return m.unpatchify(m.proj_out_2(h), gh, gw)

    def _block_for(self, *args):
        """The compiled block, compiled here for a new shape (in compile_mode, or in the default mode below
        compile_mode_min_tokens); the plain block_forward for a shape whose compilation failed (with a warning:
        slower, same numbers)."""
        if self._block is block_forward:
            return block_forward
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args) + \
            (torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else None,)
        if key not in self._compiled:
            tokens = args[0].shape[0] * args[0].shape[1]
            block = self._block_large if tokens >= self.options.compile_mode_min_tokens else self._block
            try:
                block(*args)
                self._compiled[key] = block
            except Exception as e:  # noqa: BLE001 - any compiler failure: keep sampling, eagerly
                warnings.warn(f"torch.compile of the transformer block failed for tokens {tuple(args[0].shape)} "
                              f"({type(e).__name__}: {str(e)[:300]}); running this shape without compile")
                self._compiled[key] = block_forward
        return self._compiled[key]

    # ------------------------------------------------------------------ CUDA graphs
    def _replay(self, inputs: tuple) -> torch.Tensor:
        key = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in inputs) + (self.autocast_dtype,)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(inputs)
        if entry is False:
            return self._forward(*inputs)
        graph, static_inputs, static_out = entry
        for static, given in zip(static_inputs, inputs):
            if given is not None:
                static.copy_(given)
        graph.replay()
        # The output lives in the graphs' shared pool, which the next replay of another graph may reuse.
        return static_out.clone()

    def _capture(self, inputs: tuple):
        with torch.inference_mode(False), torch.no_grad():  # the static inputs are written at every replay
            static = tuple(None if t is None else t.clone() for t in inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles, autotunes, fills caches (RoPE tables) outside the graph
            for _ in range(2):
                self._forward(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            # One pool and one capture stream for all this denoiser's graphs: the allocator reuses a freed
            # block only on the stream that freed it, so graphs captured on several streams would not share.
            self._graph_pool, self._capture_stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # Its own capture stream on this device (torch's shared one lives on the device it was first made on).
            with torch.cuda.graph(graph, pool=self._graph_pool, stream=self._capture_stream):
                out = self._forward(*static)
        except Exception as e:  # a kernel that cannot be captured: run this shape without a graph
            warnings.warn(f"CUDA graph capture failed for input shape {tuple(inputs[0].shape)} "
                          f"({type(e).__name__}: {e}); running it without a graph")
            return False
        return graph, static, out

    @property
    def num_graphs(self) -> int:
        return sum(1 for e in self._graphs.values() if e)

    def status(self) -> dict:
        """What the fast path did so far: attention kernel per (rows, tokens), whether the Triton norm kernels
        are in use (fused_norms, fused_residual after the device check), CUDA graphs captured and failed,
        block regions compiled (one per input shape, two with fused_residual; of these, in compile_mode) and
        regions that fell back to the plain block."""
        return {"attention": dict(self.attention_choice), "fused_norms": self.fused_norms,
                "fused_residual": self.fused_residual, "graphs": self.num_graphs,
                "graph_failures": sum(1 for e in self._graphs.values() if e is False),
                "compiled_shapes": sum(1 for f in self._compiled.values() if f is not block_forward),
                "compile_mode_shapes": sum(1 for f in self._compiled.values()
                                           if self.options.compile_mode and f is self._block_large),
                "compile_fallbacks": sum(1 for f in self._compiled.values() if f is block_forward)}


def _tensors(weights: dict):
    for w in [weights, *weights["blocks"]]:
        for key in sorted(w):
            if isinstance(w[key], torch.Tensor):
                yield w[key]


def _raise_recompile_limit(limit: int) -> None:
    """Each (stage resolution, batch) is its own static shape of the compiled block: allow that many."""
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)
