"""Position and scalar embeddings: the 256-channel sinusoid and the 2D rotary table."""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

SINUSOID_CHANNELS = 256
ROPE_THETA = 10000.0


def sinusoid_embedding(s: torch.Tensor, channels: int = SINUSOID_CHANNELS, max_period: float = 10000.0) -> torch.Tensor:
    """Embed scalars as `[cos(s f_j), sin(s f_j)]`, `f_j = exp(-ln(max_period) j / (channels/2 - 1))`.

    s: (B,) any real dtype. Returns (B, channels) float32, cosines first.
    """
    half = channels // 2
    # The release divides by (half - 1), not half; the exponent is formed in float32 in this order.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=s.device)
    freqs = torch.exp(exponent / (half - 1))
    angles = s.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ScalarEmbedder(nn.Module):
    """MLP(sinusoid(s)): Linear(256, D), SiLU, Linear(D, D). Used for model time and for the grid side."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(SINUSOID_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """s: (B,) -> (B, D) in the layer's dtype."""
        h = sinusoid_embedding(s).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(h)))


def rope_1d(positions: torch.Tensor, dim: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles for one axis, each frequency repeated for an interleaved pair.

    positions: (N,) float32. Returns cos, sin: (N, dim) float32.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)[: dim // 2] / dim))
    angles = positions[:, None].float() * freqs[None, :]
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rope_2d(grid_h: int, grid_w: int, head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """2D RoPE table for a `grid_h x grid_w` token grid in row-major order.

    The first half of head_dim rotates by the column (x) index, the second half by the row (y) index.
    Returns (grid_h * grid_w, head_dim, 2) float32, last axis (cos, sin).
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got attention_head_dim={head_dim}")
    rows = torch.arange(grid_h, dtype=torch.float32, device=device)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device)
    row_of_token = rows.repeat_interleave(grid_w)
    col_of_token = cols.repeat(grid_h)
    cos_x, sin_x = rope_1d(col_of_token, head_dim // 2)
    cos_y, sin_y = rope_1d(row_of_token, head_dim // 2)
    return torch.stack([torch.cat([cos_x, cos_y], dim=1), torch.cat([sin_x, sin_y], dim=1)], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in float32.

    x: (..., N, H, d); rope: (N, d, 2) float32. Returns x's shape and dtype.
    """
    cos = rope[..., 0].unsqueeze(-2)  # (N, 1, d), broadcast over heads
    sin = rope[..., 1].unsqueeze(-2)
    xf = x.float()
    x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)
