"""Attention for PixelFlow: dense batches for sampling, packed multi-resolution sequences for training.

A packed sequence is a flat run of tokens from images of different sizes, each image attending only to
itself. Exact kernels, chosen in this order where allowed:
  * flash-attn's varlen kernel, when installed, on CUDA, for fp16/bf16 self-attention;
  * otherwise PyTorch's scaled_dot_product_attention on each run of equal-length images, which is dense.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .embeddings import apply_rope

_BACKENDS = ("auto", "sdpa", "flash_attn")
_backend = "auto"
_flash_varlen = None


def check_attention_backend(name: str) -> None:
    """Refuse a packed-attention kernel name that is unknown, or flash_attn when flash-attn cannot be imported."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {_BACKENDS}")
    if name == "flash_attn" and _flash_attn_varlen() is None:
        raise ValueError("attention backend 'flash_attn' asked for, but flash-attn is not installed (pip install flash-attn)")


def set_attention_backend(name: str) -> None:
    """Choose the packed-attention kernel (training's train.attention): "auto" (flash-attn's varlen kernel when
    it is installed and the inputs are fp16/bf16 on CUDA), "sdpa" (pure PyTorch) or "flash_attn"."""
    global _backend
    check_attention_backend(name)
    _backend = name


def get_attention_backend() -> str:
    return _backend


def _flash_attn_varlen():
    global _flash_varlen
    if _flash_varlen is None:
        if importlib.util.find_spec("flash_attn") is None:
            _flash_varlen = False
        else:
            try:
                from flash_attn import flash_attn_varlen_func
                _flash_varlen = flash_attn_varlen_func
            except Exception:  # a broken build must not stop the pure-PyTorch path
                _flash_varlen = False
    return _flash_varlen or None


@dataclass(frozen=True)
class Run:
    """Consecutive images of one size in a packed sequence: tokens [start, end), images [first, last)."""

    start: int
    end: int
    first: int
    last: int
    seq_len: int

    @property
    def num_images(self) -> int:
        return self.last - self.first


@dataclass
class PackedLayout:
    """Where each image lives in a packed token sequence.

    grid_sizes: side of each image's (square) token grid, in packed order; seqlens: its token count.
    runs: consecutive images of one size (attended together on the pure-PyTorch path).
    cu_seqlens: (B+1,) int32 cumulative token counts on the model's device; max_seqlen: the longest image.
    rope: (L, head_dim, 2) float32 RoPE table of every token.
    """

    grid_sizes: list[int]
    seqlens: list[int]
    runs: list[Run]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    rope: torch.Tensor

    @property
    def num_images(self) -> int:
        return len(self.seqlens)

    @property
    def num_tokens(self) -> int:
        return self.runs[-1].end if self.runs else 0


def make_packed_layout(grid_sizes: list[int], rope_table, device: torch.device | str) -> PackedLayout:
    """Layout of a packed sequence of square images with the given token-grid sides (packed order).

    rope_table(side) -> (side * side, head_dim, 2) gives each image's RoPE table.
    """
    grid_sizes = [int(g) for g in grid_sizes]
    if not grid_sizes or min(grid_sizes) < 1:
        raise ValueError(f"grid_sizes must be a non-empty list of positive ints, got {grid_sizes}")
    seqlens = [g * g for g in grid_sizes]
    cu = [0]
    for n in seqlens:
        cu.append(cu[-1] + n)
    return PackedLayout(
        grid_sizes=grid_sizes,
        seqlens=seqlens,
        runs=make_runs(seqlens),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        max_seqlen=max(seqlens),
        rope=torch.cat([rope_table(g) for g in grid_sizes], dim=0),
    )


def make_runs(seqlens: list[int]) -> list[Run]:
    """Group consecutive images of equal length into runs, each attended as one dense (n, seq_len) batch."""
    runs, start, i = [], 0, 0
    while i < len(seqlens):
        j = i
        while j < len(seqlens) and seqlens[j] == seqlens[i]:
            j += 1
        end = start + seqlens[i] * (j - i)
        runs.append(Run(start, end, i, j, seqlens[i]))
        start, i = end, j
    return runs


def per_run(layout: PackedLayout | None, fn, *xs: torch.Tensor) -> torch.Tensor:
    """Apply fn(*runs, first, last) to every run of equal-length images and join the results.

    Each x in xs is packed (L, ...) and is cut into (n, seq_len, ...) views of its runs; fn returns
    (n, seq_len, ...). Dense inputs (B, N, ...) are a single run covering the batch.
    """
    if layout is None:
        return fn(*xs, 0, xs[0].shape[0])
    outs = []
    for r in layout.runs:
        views = [x[r.start:r.end].unflatten(0, (r.num_images, r.seq_len)) for x in xs]
        outs.append(fn(*views, r.first, r.last).flatten(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, layout: PackedLayout | None) -> torch.Tensor:
    """x * (1 + scale) + shift with one (shift, scale) per image: x (B, N, D) or packed (L, D); shift (B, D)."""
    return per_run(layout, lambda xr, a, b: torch.addcmul(shift[a:b, None], xr, 1 + scale[a:b, None]), x)


def gate(x: torch.Tensor, g: torch.Tensor, layout: PackedLayout | None) -> torch.Tensor:
    """g * x with one gate vector per image."""
    return per_run(layout, lambda xr, a, b: xr * g[a:b, None], x)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Lq, H, d), k/v (B, Lk, H, d), mask additive (B, 1, 1, Lk) or None -> (B, Lq, H, d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with RMS-normed q/k over the whole inner dimension and 2D RoPE.

    Self-attention rotates q and k; cross-attention (kv_dim given) rotates q only, as the release does.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int | None = None, bias: bool = True):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.is_cross = kv_dim is not None
        kv_dim = kv_dim if kv_dim is not None else dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(kv_dim, inner, bias=bias)
        self.v_proj = nn.Linear(kv_dim, inner, bias=bias)
        self.o_proj = nn.Linear(inner, dim, bias=bias)
        self.q_norm = RMSNorm(inner)
        self.k_norm = RMSNorm(inner)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        layout: PackedLayout | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, N, D) dense or (L, D) packed; rope: (N or L, head_dim, 2).

        context: (B, Lt, kv_dim) text features for cross-attention (one row per image);
        context_mask: additive (B, 1, 1, Lt) float mask (0 keep, -10000 drop) or None.
        """
        q = apply_rope(self._heads(self.q_norm(self.q_proj(x))), rope)
        source = context if self.is_cross else x
        k = self._heads(self.k_norm(self.k_proj(source)))
        v = self._heads(self.v_proj(source))
        if not self.is_cross:
            k = apply_rope(k, rope)

        if layout is None:
            out = _sdpa(q, k, v, context_mask)
        elif self.is_cross:
            out = per_run(layout, lambda qr, a, b: _sdpa(
                qr, k[a:b], v[a:b], None if context_mask is None else context_mask[a:b]), q)
        else:
            out = packed_self_attention(q, k, v, layout)
        return self.o_proj(out.flatten(-2))


def _flash_eligible(q: torch.Tensor) -> bool:
    """flash-attn's kernels take CUDA fp16/bf16 tensors only."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def packed_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Block-diagonal attention over a packed sequence: q, k, v (L, H, d) -> (L, H, d)."""
    flash = _flash_attn_varlen() if _backend in ("auto", "flash_attn") else None
    if flash is not None and _flash_eligible(q):
        return flash(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen)
    if _backend == "flash_attn":
        raise ValueError(f"flash-attn needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    return per_run(layout, lambda qr, kr, vr, a, b: _sdpa(qr, kr, vr), q, k, v)
