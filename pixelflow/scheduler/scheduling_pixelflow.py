"""The PixelFlow cascade of rectified flows: stage tables, time grids, renoising and training targets.

Flow time t runs from 0 (noise) to 1 (data). Stage 0 is the coarsest resolution. The network is fed
model time T in [0, num_train_timesteps). See SPEC sections 1, 2, 4 and 5.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK_NOISE_JITTER = 1e-6  # added to the block covariance's diagonal, as the release does


def _is_integer(value) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class PixelFlowScheduler:
    """Per-stage time tables of the PixelFlow cascade.

    Attributes (per stage k): start_t[k], end_t[k], original_start_t[k] (floats);
    timesteps_per_stage[k] (N,) float64 model times; t_window_per_stage[k] (N,) float64 in-stage times.
    After set_timesteps(n, k, shift): timesteps (n,) model times and t (n+1,) the Euler grid.
    """

    def __init__(self, num_train_timesteps: int = 1000, num_stages: int = 4, gamma: float = -1 / 3,
                 pyramid_shift: bool = False):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
        if num_stages > num_train_timesteps:  # a stage would get no time grid point: start_t >= end_t
            raise ValueError(f"num_stages={num_stages} exceeds num_train_timesteps={num_train_timesteps}: every stage "
                             "needs at least one training time step")
        if not (gamma < 0 and 1 + 3 * gamma + BLOCK_NOISE_JITTER > 0):
            # The 2x2 block covariance (1 - gamma + jitter) I + gamma 11^T has eigenvalue 1 + 3 gamma + jitter: below
            # -1/3 it is not positive definite and block noise cannot be drawn (a Cholesky error at stage 1).
            # The jitter admits -1/3 rounded to float32.
            raise ValueError(f"gamma must be in [-1/3, 0) (the block-noise correlation; -1/3 as released), got {gamma}")
        if pyramid_shift:
            raise ValueError("scheduler.pyramid_shift=true is not part of the released method; set it to false")
        self.num_train_timesteps = N = num_train_timesteps
        self.num_stages = S = num_stages
        self.gamma = gamma
        self.pyramid_shift = pyramid_shift

        t = [i / N for i in range(N)]
        self.original_start_t, self.end_t = [], []
        for k in range(S):
            a, b = int(N * k / S), min(int(N * (k + 1) / S), N)
            self.original_start_t.append(float(torch.tensor(t[a], dtype=torch.float32)))
            self.end_t.append(float(torch.tensor(t[b], dtype=torch.float32)) if b < N else 1.0)
        self.start_t = [self.original_start_t[0]] + [
            o * self.renoise_alpha(o) for o in self.original_start_t[1:]
        ]

        lengths = [e - s for s, e in zip(self.start_t, self.end_t)]
        total = sum(lengths)
        cumulative = [sum(lengths[:k]) / total for k in range(S)] + [1.0]
        grid = torch.arange(N, dtype=torch.float64)
        self.timesteps_per_stage, self.t_window_per_stage = [], []
        for k in range(S):
            lo = grid[int(N * cumulative[k])].item()
            hi = grid[min(int(N * cumulative[k + 1]), N - 1)].item()
            if k < S - 1:
                table = torch.linspace(lo, hi, N + 1, dtype=torch.float64)[:-1]
            else:
                table = torch.linspace(lo, hi, N, dtype=torch.float64)
            self.timesteps_per_stage.append(table)
            self.t_window_per_stage.append(torch.linspace(0, 1, N + 1, dtype=torch.float64)[:-1])

        self.timesteps: torch.Tensor | None = None
        self.t: torch.Tensor | None = None
        self.stage: int | None = None

    # ---------------------------------------------------------------- renoising between stages
    def renoise_alpha(self, original_start_t: float) -> float:
        """alpha = 1 / (sqrt(1 - 1/gamma) (1 - o) + o): the scale of the upsampled image at a stage start."""
        o = original_start_t
        return 1.0 / (math.sqrt(1 - 1 / self.gamma) * (1 - o) + o)

    def renoise_coefficients(self, stage: int) -> tuple[float, float]:
        """(alpha, beta) for z <- alpha * upsample(z) + beta * block_noise at the start of stage > 0."""
        self._check_stage(stage)
        o = self.original_start_t[stage]
        alpha = self.renoise_alpha(o)
        beta = alpha * (1 - o) / math.sqrt(-self.gamma)
        return alpha, beta

    def renoise(self, z: torch.Tensor, stage: int, block_noise: torch.Tensor) -> torch.Tensor:
        """The start of stage > 0: z (B, C, h, w), the previous stage's end -> alpha * upsample(z) + beta * n,
        (B, C, 2h, 2w), with n the block noise at the new size and upsample nearest-neighbour 2x."""
        alpha, beta = self.renoise_coefficients(stage)
        return alpha * F.interpolate(z, scale_factor=2, mode="nearest") + beta * block_noise

    def block_noise_cholesky(self, device=None) -> torch.Tensor:
        """Lower Cholesky factor (4, 4) of the 2x2-block covariance (1 - gamma) I + gamma 11^T + jitter I."""
        g = self.gamma
        cov = (1 - g + BLOCK_NOISE_JITTER) * torch.eye(4, dtype=torch.float64) + g * torch.ones(4, 4, dtype=torch.float64)
        return torch.linalg.cholesky(cov).to(device=device, dtype=torch.float32)

    def sample_block_noise(self, batch: int, channels: int, height: int, width: int,
                           generator: torch.Generator | list[torch.Generator] | None = None,
                           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Block noise (batch, channels, height, width): inside each 2x2 block of each channel the four values
        (row-major) are jointly Gaussian with unit variance and correlation gamma; blocks are independent.

        Drawn in one vectorised call on `device`; a list of generators draws row b from generator[b].
        """
        if height % 2 or width % 2:
            raise ValueError(f"block noise needs an even size, got {height}x{width}")
        shape = (channels, height // 2, width // 2, 4)
        if generator is None:
            generator = [None]
        elif isinstance(generator, torch.Generator):
            generator = [generator]
        if len(generator) == 1:
            white = randn((batch, *shape), generator[0], device, torch.float32)
        else:
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
            white = torch.cat([randn((1, *shape), g, device, torch.float32) for g in generator])
        correlated = white @ self.block_noise_cholesky(white.device).T
        # (b, c, h/2, w/2, 2, 2) -> (b, c, h/2, 2, w/2, 2) -> (b, c, h, w)
        blocks = correlated.unflatten(-1, (2, 2)).permute(0, 1, 2, 4, 3, 5)
        return blocks.reshape(batch, channels, height, width).to(dtype)

    # ---------------------------------------------------------------- inference grid
    def set_timesteps(self, num_inference_steps: int, stage: int, device=None, shift: float = 1.0) -> None:
        """Set `timesteps` (n,) model times and `t` (n+1,) the Euler grid of `stage`."""
        if not _is_integer(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if torch.is_tensor(shift) and shift.ndim == 0 and not (shift.is_complex() or shift.dtype == torch.bool):
            shift = shift.item()
        if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0 < shift < math.inf:
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        self._check_stage(stage)
        num_inference_steps, stage, shift = int(num_inference_steps), int(stage), float(shift)
        N = self.num_train_timesteps
        last = (N - 1) / N
        tau = torch.linspace(0, last, num_inference_steps, dtype=torch.float64)
        tau = tau / (shift + (1 - shift) * tau)
        table = self.timesteps_per_stage[stage]
        lo, hi = table[0].item(), table[-1].item()
        self.timesteps = (lo + (hi - lo) * (tau / last)).to(device)
        # Kept from the release: the grid stops at (N-1)/N and the last Euler step jumps to 1.
        self.t = torch.cat([tau, torch.ones(1, dtype=torch.float64)]).to(device)
        self.stage = stage

    def model_time(self, stage: int, s: torch.Tensor | float) -> torch.Tensor | float:
        """Model time at in-stage time s in [0, 1]: the linear map onto the stage's table ends."""
        table = self.timesteps_per_stage[stage]
        lo, hi = table[0].item(), table[-1].item()
        return lo + s * (hi - lo)

    def _check_stage(self, stage: int) -> None:
        if not _is_integer(stage) or not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be an int in [0, {self.num_stages}), got {stage!r}")

    # ---------------------------------------------------------------- training targets
    def stage_resolution(self, resolution: int, stage: int) -> int:
        """Side of a stage's images for a final side `resolution`: halved once per later stage."""
        return resolution // 2 ** (self.num_stages - 1 - stage)

    def training_targets(self, images: torch.Tensor, stage: int, timestep_index: torch.Tensor,
                         noise: torch.Tensor) -> "StageTargets":
        """Inputs and velocity targets for images trained at `stage` (SPEC section 4).

        images: (B, C, R, R) in [-1, 1] at full resolution; timestep_index: (B,) long in [0, N);
        noise: (B, C, R_k, R_k) standard normal at the stage's resolution.
        """
        self._check_stage(stage)
        halvings = self.num_stages - 1 - stage
        end = halve(images, halvings)
        if noise.shape != end.shape:
            raise ValueError(f"noise must have the stage's shape {tuple(end.shape)}, got {tuple(noise.shape)}")
        start_t, end_t = self.start_t[stage], self.end_t[stage]
        if start_t == 0.0:
            # Stage 0 starts from pure noise: its start image has weight 0, so it is not made. (Halving it could
            # not be done at an odd or 1 px side, e.g. patch_size 1 or 3; 0 * A + 1 * eps is eps bit for bit.)
            start = noise.to(torch.promote_types(end.dtype, noise.dtype))  # the dtype 0 * A + eps had
        else:
            start = F.interpolate(halve(end, 1), scale_factor=2, mode="nearest")
            start = start_t * start + (1.0 - start_t) * noise
        end = end_t * end + (1.0 - end_t) * noise
        tau = self.t_window_per_stage[stage][timestep_index.cpu()].float().to(images.device).view(-1, 1, 1, 1)
        return StageTargets(
            inputs=tau * end + (1.0 - tau) * start,
            targets=end - start,
            timesteps=self.timesteps_per_stage[stage][timestep_index.cpu()].float().to(images.device),
        )


@dataclass
class StageTargets:
    inputs: torch.Tensor     # (B, C, R_k, R_k): x_tau
    targets: torch.Tensor    # (B, C, R_k, R_k): velocity E' - A'
    timesteps: torch.Tensor  # (B,) float32 model times


def halve(x: torch.Tensor, times: int) -> torch.Tensor:
    """Bilinear halving (align_corners False, no antialias), one factor of 2 at a time, as the release does."""
    for _ in range(times):
        x = F.interpolate(x, size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)
    return x


def randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal draw from `generator`, made on the generator's device and returned on `device`.

    Use a generator on the sampling device to draw there directly (no copy)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return noise if device is None else noise.to(device)
