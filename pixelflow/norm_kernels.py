"""Triton kernels for the two normalisations of a block that torch.compile leaves far from memory speed.

At 256 px (XL, 32 rows of 4096 tokens, H100, bf16) inductor's kernels for them take, per forward:
  RMSNorm + RoPE of q and of k   49.5 ms (two kernels, 0.89 ms each per block: ~5x the time to read and
                                 write q once), reading the (N, d, 2) float32 RoPE table for every element
  LayerNorm + adaLN modulation   16.9 ms (0.60 ms per block, ~3x)
Here a program takes one token (or a few, see LAUNCH), reads its row once, reduces in registers and writes the
result, with the RoPE angles read once per pair position and shared by all heads. A third operator,
add_layer_norm_modulate, first adds the previous block's gated MLP output to the residual stream (fast.py's
fused_residual), so that the sum is read once for both. A fourth, rms_rope_padded, writes each head of q or k
padded with zero channels (fast.py's head_pad), so that attention at a padded head size needs no copy.

All three are custom operators, opaque to torch.compile. They launch the Triton kernel for CUDA tensors (or for
CPU tensors under TRITON_INTERPRET=1, which is how tests/test_norm_kernels.py runs the kernels on the CPU) and
compute the reference formulas otherwise. On CUDA, results equal the model's own computation under autocast up
to the order of the sums (and each rounding's direction). The one difference is on the CPU under bf16 autocast,
where layer_norm returns bf16 and the model rounds there. The kernels use float32 throughout, as CUDA
autocast does.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the annotations of the ops defined
# here, and before torch 2.5 it cannot read them as strings.
import contextlib
import os

import torch
import torch.nn.functional as F

from .model.embeddings import apply_rope, rope_2d

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - missing or broken: the reference formulas run instead
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Whether the Triton kernels can run here (Triton imports)."""
    return triton is not None


def _launch(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


# ---------------------------------------------------------------------------------------------- references
def rms_rope_reference(x: torch.Tensor, weight: torch.Tensor, rope: torch.Tensor, heads: int,
                       eps: float) -> torch.Tensor:
    """RMSNorm over all of x's channels (float32, rounded to x's dtype, as the model's RMSNorm), then RoPE of
    each head's interleaved pairs (float32, rounded): x (B, N, H*d), rope (N, d, 2) -> (B, N, H, d)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
    return apply_rope(normed.unflatten(-1, (heads, -1)), rope)


def rms_rope_padded_reference(x: torch.Tensor, weight: torch.Tensor, rope: torch.Tensor, heads: int, eps: float,
                              size: int) -> torch.Tensor:
    """rms_rope_reference with each head written at `size` channels, zeros after its d: (B, N, H, size)."""
    out = rms_rope_reference(x, weight, rope, heads, eps)
    return F.pad(out, (0, size - out.shape[-1]))


def layer_norm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                  eps: float) -> torch.Tensor:
    """(LayerNorm(x) * (1 + scale) + shift) in float32, rounded to x's dtype: x (B, N, D), shift/scale (B, D).
    The LayerNorm output stays float32, as under autocast (where layer_norm computes in float32)."""
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return torch.addcmul(shift.float()[:, None], h, 1 + scale.float()[:, None]).to(x.dtype)


def add_layer_norm_modulate_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                      scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's gated residual, then the next LayerNorm + modulation: s = x + (y * gate) rounded to x's
    dtype, as the model adds it; returns (s, layer_norm_modulate_reference(s, shift, scale, eps))."""
    total = x + (y * gate[:, None]).to(x.dtype)
    return total, layer_norm_modulate_reference(total, shift, scale, eps)


# ---------------------------------------------------------------------------------------------- kernels
if triton is not None:
    @triton.jit
    def _rms_rope_kernel(x_ptr, w_ptr, rope_ptr, out_ptr, n_rows, seq, stride_b, stride_n, eps,
                         C: tl.constexpr, HALF_D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # ROWS tokens per program. A token's C = H*d channels are C/2 (even, odd) pairs; pair j is channels
        # 2j, 2j+1, and its rotation angle is the table's at head position 2 * (j % (d/2)).
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        b = rows // seq
        n = rows % seq
        j = tl.arange(0, BLOCK)
        offs = 2 * j[:, None] + tl.arange(0, 2)[None, :]                     # (BLOCK, 2)
        row_ok = rows < n_rows
        mask = row_ok[:, None, None] & (offs < C)[None, :, :]                 # (ROWS, BLOCK, 2)
        src = x_ptr + (b * stride_b + n * stride_n)[:, None, None] + offs[None, :, :]
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / C + eps)
        w = tl.load(w_ptr + offs, mask=offs < C, other=0.0)
        y = (x * rstd[:, None, None] * w[None, :, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
        ye, yo = tl.split(y)                                                  # (ROWS, BLOCK) each
        pair_ok = row_ok[:, None] & (j < C // 2)[None, :]
        # (N, d, 2) table: (n, 2i, cos/sin) at n*2d + 4i + 0/1
        table = rope_ptr + (n * (4 * HALF_D))[:, None] + (4 * (j % HALF_D))[None, :]
        cos = tl.load(table, mask=pair_ok, other=0.0)
        sin = tl.load(table + 1, mask=pair_ok, other=0.0)
        out = tl.join(ye * cos - yo * sin, yo * cos + ye * sin)
        dst = out_ptr + (rows * C)[:, None, None] + offs[None, :, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_rope_padded_kernel(x_ptr, w_ptr, rope_ptr, out_ptr, n_rows, seq, stride_b, stride_n, eps,
                                C: tl.constexpr, HALF_D: tl.constexpr, HALF_P: tl.constexpr, HEADS: tl.constexpr,
                                BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # _rms_rope_kernel writing each head at 2 * HALF_P channels: output pair jo is head jo // HALF_P,
        # position jo % HALF_P; positions past HALF_D read nothing (zeros, so their output is zero too).
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        b = rows // seq
        n = rows % seq
        jo = tl.arange(0, BLOCK)
        pos = jo % HALF_P
        valid = (pos < HALF_D) & (jo < HEADS * HALF_P)
        j = (jo // HALF_P) * HALF_D + pos                                     # the source pair
        pair = tl.arange(0, 2)
        offs = 2 * j[:, None] + pair[None, :]                                 # (BLOCK, 2)
        row_ok = rows < n_rows
        mask = row_ok[:, None, None] & valid[None, :, None] & (pair < 2)[None, None, :]
        src = x_ptr + (b * stride_b + n * stride_n)[:, None, None] + offs[None, :, :]
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / C + eps)
        w = tl.load(w_ptr + offs, mask=valid[:, None] & (pair < 2)[None, :], other=0.0)
        y = (x * rstd[:, None, None] * w[None, :, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
        ye, yo = tl.split(y)
        pair_ok = row_ok[:, None] & valid[None, :]
        table = rope_ptr + (n * (4 * HALF_D))[:, None] + (4 * pos)[None, :]
        cos = tl.load(table, mask=pair_ok, other=0.0)
        sin = tl.load(table + 1, mask=pair_ok, other=0.0)
        out = tl.join(ye * cos - yo * sin, yo * cos + ye * sin)
        dst = out_ptr + (rows * (2 * HEADS * HALF_P))[:, None, None] + (2 * jo[:, None] + pair[None, :])[None, :, :]
        store = row_ok[:, None, None] & (jo < HEADS * HALF_P)[None, :, None] & (pair < 2)[None, None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=store)

    @triton.jit
    def _load_tokens(x_ptr, stride_b, stride_n, n_rows, seq, C: tl.constexpr, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr):
        """A program's ROWS tokens as one contiguous run each: (rows, b, n, c, mask, x), x (ROWS, BLOCK) in
        float32, zero where masked (channels past C, tokens past the last)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        b = rows // seq
        n = rows % seq
        c = tl.arange(0, BLOCK)
        mask = (rows < n_rows)[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + (b * stride_b + n * stride_n)[:, None] + c[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        return rows, b, n, c, mask, x

    @triton.jit
    def _rms_rope_flat_kernel(x_ptr, w_ptr, rope_ptr, out_ptr, n_rows, seq, stride_b, stride_n, eps,
                              C: tl.constexpr, HALF_D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # The "flat" form of _rms_rope_kernel: a token's channels load and store as one contiguous run (wide
        # vector accesses), and are split into (even, odd) pairs in registers for the rotation.
        rows, b, n, c, mask, x = _load_tokens(x_ptr, stride_b, stride_n, n_rows, seq, C, BLOCK, ROWS)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
        w = tl.load(w_ptr + c[None, :], mask=(c < C)[None, :], other=0.0)
        y = (x * rstd[:, None] * w).to(out_ptr.dtype.element_ty).to(tl.float32)
        ye, yo = tl.split(tl.reshape(y, (ROWS, BLOCK // 2, 2)))              # (ROWS, BLOCK // 2) each
        # (cos, sin) of each pair, loaded as pairs and split like y, so that both halves share y's layout
        j = tl.arange(0, BLOCK // 2)
        pair_ok = (rows < n_rows)[:, None, None] & (j < C // 2)[None, :, None]
        table = rope_ptr + (n * (4 * HALF_D))[:, None, None] + (4 * (j % HALF_D))[None, :, None] + \
            tl.arange(0, 2)[None, None, :]
        cos, sin = tl.split(tl.load(table, mask=pair_ok, other=0.0))
        out = tl.reshape(tl.join(ye * cos - yo * sin, yo * cos + ye * sin), (ROWS, BLOCK))
        tl.store(out_ptr + (rows * C)[:, None] + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_rope_partner_kernel(x_ptr, w_ptr, rope_ptr, out_ptr, n_rows, seq, stride_b, stride_n, eps,
                                 C: tl.constexpr, HALF_D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # The "partner" form: like "flat", one contiguous run per token, but each channel also loads its pair
        # partner (channel c ^ 1, from the cache: the row was just read) instead of regrouping registers, so
        # every tensor keeps one layout. Even channel: y_c cos - y_{c+1} sin; odd: y_c cos + y_{c-1} sin.
        rows, b, n, c, mask, x = _load_tokens(x_ptr, stride_b, stride_n, n_rows, seq, C, BLOCK, ROWS)
        partner = tl.load(x_ptr + (b * stride_b + n * stride_n)[:, None] + (c ^ 1)[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)[:, None]
        w = tl.load(w_ptr + c[None, :], mask=(c < C)[None, :], other=0.0)
        w_partner = tl.load(w_ptr + (c ^ 1)[None, :], mask=(c < C)[None, :], other=0.0)
        y = (x * rstd * w).to(out_ptr.dtype.element_ty).to(tl.float32)
        y_partner = (partner * rstd * w_partner).to(out_ptr.dtype.element_ty).to(tl.float32)
        table = rope_ptr + (n * (4 * HALF_D))[:, None] + (4 * ((c // 2) % HALF_D))[None, :]
        cos = tl.load(table, mask=mask, other=0.0)
        sin = tl.load(table + 1, mask=mask, other=0.0)
        out = y * cos + tl.where((c % 2 == 0)[None, :], -(y_partner * sin), y_partner * sin)
        tl.store(out_ptr + (rows * C)[:, None] + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _per_image(ptr, stride, b, image, c, mask, C: tl.constexpr, SHARED: tl.constexpr):
        """A (B, C) float32 tensor's rows for a program's tokens: (ROWS, BLOCK), or (1, BLOCK) when SHARED."""
        if SHARED:
            rows = tl.load(ptr + image * stride + c[None, :], mask=(c < C)[None, :], other=0.0)
        else:
            rows = tl.load(ptr + (b * stride)[:, None] + c[None, :], mask=mask, other=0.0)
        return rows

    @triton.jit
    def _layer_norm_modulate_kernel(x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, sum_ptr, out_ptr, n_rows, seq,
                                    stride_b, stride_n, y_stride_b, y_stride_n, gate_stride, shift_stride,
                                    scale_stride, eps, C: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                                    SHARED: tl.constexpr, RESIDUAL: tl.constexpr):
        # SHARED ("shared" form, where ROWS divides seq): a program's tokens are of one image and share its
        # shift and scale (and gate), loaded once (float32, each twice a bf16 token's size), at the cost of a
        # layout change. RESIDUAL: first x <- x + (y * gate) rounded to x's dtype, as the block adds its gated
        # MLP branch to the residual stream, and that sum is written out too.
        rows, b, n, c, mask, x = _load_tokens(x_ptr, stride_b, stride_n, n_rows, seq, C, BLOCK, ROWS)
        image = (tl.program_id(0).to(tl.int64) * ROWS) // seq
        if RESIDUAL:
            y = tl.load(y_ptr + (b * y_stride_b + n * y_stride_n)[:, None] + c[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            gate = _per_image(gate_ptr, gate_stride, b, image, c, mask, C, SHARED)
            dtype = sum_ptr.dtype.element_ty
            x = (x + (y * gate).to(dtype).to(tl.float32)).to(dtype)
            tl.store(sum_ptr + (rows * C)[:, None] + c[None, :], x, mask=mask)
            x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / C + eps)
        shift = _per_image(shift_ptr, shift_stride, b, image, c, mask, C, SHARED)
        scale = _per_image(scale_ptr, scale_stride, b, image, c, mask, C, SHARED)
        out = shift + (centred * rstd[:, None]) * (1 + scale)
        tl.store(out_ptr + (rows * C)[:, None] + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) with unit channel stride (a slice of a merged projection is fine as it is)."""
    return x if x.stride(-1) == 1 else x.contiguous()


# Launch configs: (tokens per program, warps, form). rms_rope's forms: "pairs" (channels loaded as (even, odd)
# pairs, _rms_rope_kernel), "flat" (one contiguous run per token, regrouped into pairs in registers,
# _rms_rope_flat_kernel), "partner" (one contiguous run, and each channel's partner read again from the cache,
# _rms_rope_partner_kernel). layer_norm_modulate's: "per-token" shift and scale loads, or "shared" by a
# program's tokens (where they are of one image). None: "pairs" / "per-token", one token per program, warps by
# row width: what the H200 run of 2026-11-27 measured. layer_norm_modulate's (2, 4, "per-token"): on an H100
# (2026-11-27, stop 18) 0.381 ms against the default's 0.480 at the 256 px shape (32 x 4096 tokens, width 1152).
# Fixed, not tuned per process: the layout sets the order of a row's sums, so a timing-based pick could change
# the low bits of images between runs or ranks. benchmarks/gpu_check.py times every one of CONFIGS.
CONFIGS: dict[str, tuple[tuple, ...]] = {
    "rms_rope": ((1, 4, "pairs"), (2, 4, "pairs"), (4, 8, "pairs"), (1, 4, "flat"), (2, 8, "flat"), (4, 8, "flat"),
                 (1, 4, "partner"), (1, 8, "partner"), (2, 4, "partner"), (2, 8, "partner"), (4, 8, "partner")),
    "layer_norm_modulate": ((1, 4, "per-token"), (1, 8, "per-token"), (2, 4, "per-token"), (2, 8, "per-token"),
                            (4, 8, "per-token"), (8, 8, "per-token"), (2, 8, "shared"), (4, 8, "shared"),
                            (8, 8, "shared")),
}
CONFIGS["add_layer_norm_modulate"] = CONFIGS["layer_norm_modulate"]  # the same kernel, with the residual
LAUNCH: dict[str, tuple | None] = {"rms_rope": None, "layer_norm_modulate": (2, 4, "per-token"),
                                   "add_layer_norm_modulate": None}
FORMS = {"rms_rope": ("pairs", "flat", "partner"), "layer_norm_modulate": ("per-token", "shared"),
         "add_layer_norm_modulate": ("per-token", "shared")}


def _config(kernel: str, block: int) -> tuple:
    """The launch config of `kernel` for rows of `block` (a power of two) elements."""
    config = LAUNCH[kernel]
    forms = FORMS[kernel]
    if config is None:
        config = (1, max(1, min(8, block // 256)), forms[0])
    if (not isinstance(config, tuple) or len(config) != 3 or config[2] not in forms
            or not all(isinstance(v, int) and v >= 1 for v in config[:2])):
        raise ValueError(f"norm_kernels.LAUNCH[{kernel!r}] = {LAUNCH[kernel]!r}: expected None or (tokens per "
                         f"program, warps, form) with form one of {forms}, like {CONFIGS[kernel][0]}")
    return config


def _device(x: torch.Tensor):
    """Launch on x's GPU, whatever the current device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- operators
def _check_rms_rope(x: torch.Tensor, weight: torch.Tensor, rope: torch.Tensor, heads: int) -> None:
    if x.ndim != 3 or heads < 1 or x.shape[-1] % heads or (x.shape[-1] // heads) % 2:
        raise ValueError(f"rms_rope needs x (B, N, heads * d) with d even; got x {tuple(x.shape)}, heads {heads}")
    if weight.shape != (x.shape[-1],) or rope.shape != (x.shape[1], x.shape[-1] // heads, 2):
        raise ValueError(f"rms_rope needs weight ({x.shape[-1]},) and rope ({x.shape[1]}, "
                         f"{x.shape[-1] // heads}, 2); got weight {tuple(weight.shape)}, rope {tuple(rope.shape)}")


@torch.library.custom_op("pixelflow::rms_rope", mutates_args=())
def rms_rope(x: torch.Tensor, weight: torch.Tensor, rope: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """rms_rope_reference as one kernel: x (B, N, H*d) -> (B, N, H, d) contiguous, x's dtype. rope: the
    model's table (N, d, 2), whose angles come in equal pairs (rope_1d repeats each frequency for its
    interleaved pair): the kernel reads one angle per pair."""
    _check_rms_rope(x, weight, rope, heads)
    if not _launch(x):
        return rms_rope_reference(x, weight, rope, heads, eps).contiguous()
    b, n, c = x.shape
    x, weight, rope = _rows(x), weight.float().contiguous(), rope.float().contiguous()
    out = torch.empty(b, n, heads, c // heads, device=x.device, dtype=x.dtype)
    rows, warps, form = _config("rms_rope", triton.next_power_of_2(c // 2))
    kernel = {"pairs": _rms_rope_kernel, "flat": _rms_rope_flat_kernel, "partner": _rms_rope_partner_kernel}[form]
    block = triton.next_power_of_2(c // 2 if form == "pairs" else c)
    with _device(x):
        kernel[(triton.cdiv(b * n, rows),)](
            x, weight, rope, out, b * n, n, x.stride(0), x.stride(1), eps, C=c, HALF_D=c // heads // 2,
            BLOCK=block, ROWS=rows, num_warps=warps)
    return out


@rms_rope.register_fake
def _(x, weight, rope, heads, eps):
    return x.new_empty(*x.shape[:-1], heads, x.shape[-1] // heads)


@torch.library.custom_op("pixelflow::rms_rope_padded", mutates_args=())
def rms_rope_padded(x: torch.Tensor, weight: torch.Tensor, rope: torch.Tensor, heads: int, eps: float,
                    size: int) -> torch.Tensor:
    """rms_rope with each head written at `size` >= d channels, zeros after its d: x (B, N, H*d) ->
    (B, N, H, size) contiguous, in one kernel (the "pairs" form, whatever LAUNCH's form; its tokens per program
    and warps apply). For attention at a padded head size (fast.py's head_pad) without a padding copy."""
    _check_rms_rope(x, weight, rope, heads)
    d = x.shape[-1] // heads
    if isinstance(size, bool) or not isinstance(size, int) or size < d or size % 2:
        raise ValueError(f"rms_rope_padded needs an even size >= the head size {d}, got {size!r}")
    if not _launch(x):
        return rms_rope_padded_reference(x, weight, rope, heads, eps, size).contiguous()
    b, n, c = x.shape
    x, weight, rope = _rows(x), weight.float().contiguous(), rope.float().contiguous()
    out = torch.empty(b, n, heads, size, device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(heads * size // 2)
    rows, warps, _ = _config("rms_rope", triton.next_power_of_2(c // 2))
    with _device(x):
        _rms_rope_padded_kernel[(triton.cdiv(b * n, rows),)](
            x, weight, rope, out, b * n, n, x.stride(0), x.stride(1), eps, C=c, HALF_D=d // 2, HALF_P=size // 2,
            HEADS=heads, BLOCK=block, ROWS=rows, num_warps=warps)
    return out


@rms_rope_padded.register_fake
def _(x, weight, rope, heads, eps, size):
    return x.new_empty(*x.shape[:-1], heads, size)


def _check_layer_norm(op: str, x: torch.Tensor, *per_image: torch.Tensor, names: str = "shift, scale") -> None:
    if x.ndim != 3 or any(t.shape != (x.shape[0], x.shape[2]) for t in per_image):
        raise ValueError(f"{op} needs x (B, N, D) and {names} (B, D); got x {tuple(x.shape)}, " +
                         ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(names.split(", "), per_image)))


def _layer_norm_launch(kernel: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       y: torch.Tensor | None = None, gate: torch.Tensor | None = None):
    """Launches _layer_norm_modulate_kernel; returns (sum or None, normalised)."""
    b, n, c = x.shape
    x = _rows(x)
    shift, scale, gate = (None if t is None else t.float() if t.stride(-1) == 1 else t.float().contiguous()
                          for t in (shift, scale, gate))
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = None if y is None else torch.empty_like(out)
    y = None if y is None else _rows(y)  # any float dtype: the kernel rounds only the product, as the reference
    block = triton.next_power_of_2(c)
    rows, warps, form = _config(kernel, block)
    residual = y is not None
    with _device(x):
        _layer_norm_modulate_kernel[(triton.cdiv(b * n, rows),)](
            x, y if residual else x, gate if residual else shift, shift, scale, total if residual else out, out,
            b * n, n, x.stride(0), x.stride(1), *(y.stride()[:2] if residual else (0, 0)),
            gate.stride(0) if residual else 0, shift.stride(0), scale.stride(0), eps, C=c, BLOCK=block, ROWS=rows,
            SHARED=form == "shared" and n % rows == 0, RESIDUAL=residual, num_warps=warps)
    return total, out


@torch.library.custom_op("pixelflow::layer_norm_modulate", mutates_args=())
def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """layer_norm_modulate_reference as one kernel: x (B, N, D), shift/scale (B, D) -> (B, N, D), x's dtype."""
    _check_layer_norm("layer_norm_modulate", x, shift, scale)
    if not _launch(x):
        return layer_norm_modulate_reference(x, shift, scale, eps)
    return _layer_norm_launch("layer_norm_modulate", x, shift, scale, eps)[1]


@layer_norm_modulate.register_fake
def _(x, shift, scale, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("pixelflow::add_layer_norm_modulate", mutates_args=())
def add_layer_norm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                            scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """add_layer_norm_modulate_reference as one kernel: x, y (B, N, D), gate/shift/scale (B, D) -> (sum,
    normalised), both (B, N, D) in x's dtype: x and y read once, where an add kernel and then the LayerNorm
    kernel would read x, y and the sum."""
    _check_layer_norm("add_layer_norm_modulate", x, gate, shift, scale, names="gate, shift, scale")
    if y.shape != x.shape:
        raise ValueError(f"add_layer_norm_modulate needs y shaped like x {tuple(x.shape)}, got {tuple(y.shape)}")
    if not _launch(x):
        total, out = add_layer_norm_modulate_reference(x, y, gate, shift, scale, eps)
        return total.contiguous(), out
    return _layer_norm_launch("add_layer_norm_modulate", x, shift, scale, eps, y=y, gate=gate)


@add_layer_norm_modulate.register_fake
def _(x, y, gate, shift, scale, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


_WORKS: dict[tuple, bool] = {}


def works(device: torch.device | str, dtype: torch.dtype, hidden: int, heads: int, head_dim: int,
          ops: tuple[str, ...] = ("rms_rope", "layer_norm_modulate"), pads: tuple[int, ...] = ()) -> bool:
    """Whether the kernels of `ops` compile, run and match their references on `device` at a model's widths
    (the kernels are compiled per width), on a few tokens; with "rms_rope" in ops, rms_rope_padded at each head
    size of `pads` too. Cached. False without Triton (the operators would run the reference formulas, unfused).
    The fast path checks this before using them, as it checks the GELU epilogue, so that a GPU or a Triton they
    fail on costs speed, not a crash."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, dtype, hidden, heads, head_dim, tuple(ops), tuple(pads), tuple(LAUNCH.items()))
    if key not in _WORKS:
        _WORKS[key] = available() and _works(device, dtype, hidden, heads, head_dim, ops, pads)
    return _WORKS[key]


def _works(device: torch.device, dtype: torch.dtype, hidden: int, heads: int, head_dim: int,
           ops: tuple[str, ...], pads: tuple[int, ...] = ()) -> bool:
    # 2 x 16 tokens: Triton compiles integer arguments divisible by 16 (as every stage's token counts are) into
    # their own variant; q and k slices of a qkv projection and a contiguous q (no merge, cross-attention).
    inner = heads * head_dim
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(2, 16, 3 * inner, device=device, generator=gen).to(dtype)
    weight = torch.rand(inner, device=device, generator=gen) + 0.5
    rope = rope_2d(4, 4, head_dim, device=device)
    h, y = torch.randn(2, 2, 16, hidden, device=device, generator=gen).to(dtype)
    shift, scale, gate = torch.randn(2, 6, hidden, device=device, generator=gen).unbind(1)[:3]
    try:
        pairs = []
        if "rms_rope" in ops:
            pairs += [(rms_rope(x, weight, rope, heads, 1e-6), rms_rope_reference(x, weight, rope, heads, 1e-6))
                      for x in (qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., :inner].contiguous())]
            pairs += [(rms_rope_padded(x, weight, rope, heads, 1e-6, size),
                       rms_rope_padded_reference(x, weight, rope, heads, 1e-6, size))
                      for size in pads for x in (qkv[..., :inner], qkv[..., inner:2 * inner])]
        if "layer_norm_modulate" in ops:
            pairs.append((layer_norm_modulate(h, shift, scale, 1e-6),
                          layer_norm_modulate_reference(h, shift, scale, 1e-6)))
        if "add_layer_norm_modulate" in ops:
            pairs += zip(add_layer_norm_modulate(h, y, gate, shift, scale, 1e-6),
                         add_layer_norm_modulate_reference(h, y, gate, shift, scale, 1e-6))
        return all(bool(((out.float() - ref.float()).abs() <= 2 ** -6 * ref.float().abs().max()).all())
                   for out, ref in pairs)
    except Exception:  # noqa: BLE001 - compile or launch failure: not usable here
        return False
