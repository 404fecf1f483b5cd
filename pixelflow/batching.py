"""Packed multi-resolution training batches (SPEC section 4).

Each image of a batch trains one stage, at that stage's resolution. Images are grouped by stage, finest
first (as the release), and their patches concatenated into one token sequence; the model attends within
each image only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .model.pixelflow_model import patchify
from .scheduler import PixelFlowScheduler


@dataclass
class PackedBatch:
    """tokens/targets: (L, C*p*p) features ordered (channel, row-in-patch, col-in-patch).
    timesteps: (B,) model times; grid_sizes: token-grid side per image; order: (B,) original batch index
    of each packed image. All per-image tensors in packed order."""

    tokens: torch.Tensor
    targets: torch.Tensor
    timesteps: torch.Tensor
    grid_sizes: list[int]
    order: torch.Tensor

    @property
    def seqlens(self) -> list[int]:
        return [g * g for g in self.grid_sizes]

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.tensor([0] + self.seqlens, dtype=torch.int32).cumsum(0).to(torch.int32)


def assign_stages(batch_size: int, num_stages: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stage per image: [0..S-1] repeated to the batch size, truncated, shuffled. (B,) long on the CPU."""
    stages = torch.arange(num_stages).repeat(batch_size // num_stages + 1)[:batch_size]
    return stages[torch.randperm(batch_size, generator=generator)]


def patchify_tokens(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/p * W/p, C * p * p), images one after another, features (channel, row, col)."""
    return patchify(x, patch_size).flatten(0, 1)


def pack_batch(scheduler: PixelFlowScheduler, images: torch.Tensor, stages: torch.Tensor,
               timestep_index: torch.Tensor, noise: Callable[[int, tuple], torch.Tensor],
               patch_size: int) -> PackedBatch:
    """Build the packed training batch.

    images: (B, C, R, R) in [-1, 1]; stages: (B,) stage per image; timestep_index: (B,) long in [0, N);
    noise(stage, shape) -> standard normal noise of that shape (one draw per stage group, images in batch order).
    """
    tokens, targets, timesteps, grids, order = [], [], [], [], []
    resolution = images.shape[-1]
    stages_cpu = stages.cpu()
    for stage in reversed(range(scheduler.num_stages)):  # finest group first, as the release packs them
        members = (stages_cpu == stage).nonzero().flatten()
        if members.numel() == 0:
            continue
        side = scheduler.stage_resolution(resolution, stage)
        selected = images[members.to(images.device)]
        eps = noise(stage, (len(members), images.shape[1], side, side)).to(images.device, images.dtype)
        result = scheduler.training_targets(selected, stage, timestep_index[members], eps)
        tokens.append(patchify_tokens(result.inputs, patch_size))
        targets.append(patchify_tokens(result.targets, patch_size))
        timesteps.append(result.timesteps)
        grids += [side // patch_size] * len(members)
        order.append(members)
    return PackedBatch(
        tokens=torch.cat(tokens), targets=torch.cat(targets), timesteps=torch.cat(timesteps),
        grid_sizes=grids, order=torch.cat(order),
    )


def per_image_mse(prediction: torch.Tensor, target: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Squared error averaged within each image: (L, F) packed -> (B,) in float32."""
    sq = (prediction.float() - target.float()).pow(2).mean(dim=-1)
    lengths = torch.tensor(seqlens, device=sq.device)
    image_of_token = torch.repeat_interleave(torch.arange(len(seqlens), device=sq.device), lengths)
    sums = torch.zeros(len(seqlens), device=sq.device, dtype=sq.dtype).index_add_(0, image_of_token, sq)
    return sums / lengths
