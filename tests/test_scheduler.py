"""Block noise (SPEC section 5): the statistics of each 2x2 block, independence across blocks, reproducibility.

The stage tables and time grids are checked against the release in test_golden.py.
"""

from __future__ import annotations

import pytest
import torch

from pixelflow.scheduler import PixelFlowScheduler

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

GAMMA = -1 / 3
JITTER = 1e-6  # added to the covariance's diagonal (SPEC section 5)
STAT_TOL = 0.02


@pytest.fixture(scope="module")
def scheduler() -> PixelFlowScheduler:
    return PixelFlowScheduler(num_train_timesteps=1000, num_stages=4, gamma=GAMMA)


@pytest.fixture(scope="module")
def noise(scheduler) -> torch.Tensor:
    """50 x 4 channels x 64 x 64 = 204,800 blocks, float64 for the statistics."""
    draw = scheduler.sample_block_noise(50, 4, 64, 64, generator=torch.Generator().manual_seed(0), device="cpu")
    assert draw.shape == (50, 4, 64, 64) and draw.dtype == torch.float32 and draw.device.type == "cpu"
    return draw.double()


def blocks_of(noise: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*C*H/2*W/2, 4): every 2x2 block's values, row-major within the block."""
    b, c, h, w = noise.shape
    grid = noise.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5)
    return grid.reshape(-1, 4)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_block_values_have_unit_variance_and_correlation_gamma(noise):
    blocks = blocks_of(noise)
    assert blocks.shape[0] >= 200_000
    assert blocks.mean(0).abs().max().item() < STAT_TOL
    covariance = torch.cov(blocks.T)
    for i in range(4):
        assert covariance[i, i].item() == pytest.approx(1.0, abs=STAT_TOL)
        for j in range(i + 1, 4):
            rho = covariance[i, j] / (covariance[i, i] * covariance[j, j]).sqrt()
            assert rho.item() == pytest.approx(GAMMA, abs=STAT_TOL), (i, j)


def test_each_block_sums_to_about_zero(noise):
    sums = blocks_of(noise).sum(dim=1)
    # 1^T Sigma 1 with Sigma = (1 - gamma + jitter) I + gamma 11^T: 4(1 - gamma + jitter) + 16 gamma = 4e-6.
    expected_variance = 4 * (1 - GAMMA + JITTER) + 16 * GAMMA
    assert 0.5 * expected_variance < sums.var().item() < 2 * expected_variance
    assert sums.abs().max().item() < 0.02  # ~10 standard deviations of 2e-3


def test_neighbouring_blocks_are_uncorrelated(noise):
    # Pixels on either side of a block boundary, horizontally and vertically, and across channels.
    assert abs(correlation(noise[..., 1:-1:2], noise[..., 2::2])) < STAT_TOL
    assert abs(correlation(noise[..., 1:-1:2, :], noise[..., 2::2, :])) < STAT_TOL
    assert abs(correlation(noise[:, 0], noise[:, 1])) < STAT_TOL
    assert abs(correlation(noise[0], noise[1])) < STAT_TOL


def test_block_noise_is_reproducible_from_a_seed(scheduler):
    def draw(seed: int) -> torch.Tensor:
        return scheduler.sample_block_noise(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed), device="cpu")

    assert torch.equal(draw(11), draw(11))
    assert not torch.allclose(draw(11), draw(12))


def test_per_image_generators_give_each_row_its_own_draw(scheduler):
    seeds = [5, 6, 7]
    batch = scheduler.sample_block_noise(3, 3, 8, 16, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                         device="cpu")
    assert batch.shape == (3, 3, 8, 16)
    for row, seed in enumerate(seeds):
        alone = scheduler.sample_block_noise(1, 3, 8, 16, generator=torch.Generator().manual_seed(seed),
                                             device="cpu")
        assert torch.equal(batch[row], alone[0])


def test_block_noise_rejects_bad_shapes_and_generator_counts(scheduler):
    with pytest.raises(ValueError, match=r"7x8"):
        scheduler.sample_block_noise(1, 3, 7, 8)
    generators = [torch.Generator().manual_seed(s) for s in range(2)]
    with pytest.raises(ValueError, match=r"2 generators.*3"):
        scheduler.sample_block_noise(3, 3, 8, 8, generator=generators)


def test_set_timesteps_checks_its_arguments_and_takes_numpy_integers(scheduler):
    import numpy as np
    scheduler.set_timesteps(5, 1, shift=2.0)
    expected = scheduler.timesteps.clone(), scheduler.t.clone()
    for shift in (np.float64(2.0), torch.tensor(2.0)):
        scheduler.set_timesteps(np.int64(5), np.int64(1), shift=shift)
        assert torch.equal(scheduler.timesteps, expected[0]) and torch.equal(scheduler.t, expected[1])
    for shift in (float("inf"), float("nan"), 0.0, -1.0, True, "2"):
        with pytest.raises(ValueError, match="shift must be a finite number > 0"):
            scheduler.set_timesteps(5, 1, shift=shift)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got True"):
        scheduler.set_timesteps(True, 0)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        scheduler.set_timesteps(0, 0)
    with pytest.raises(ValueError, match="stage must be an int"):
        scheduler.set_timesteps(5, True)


def test_renoise_upsamples_then_mixes_in_block_noise():
    s = PixelFlowScheduler(1000, 4)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    n = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    alpha, beta = s.renoise_coefficients(2)
    out = s.renoise(z, 2, n)
    assert out.shape == (2, 3, 8, 8)
    # each 2x2 block of the upsampled image repeats one pixel of z
    assert torch.allclose(out - beta * n, alpha * z.repeat_interleave(2, -1).repeat_interleave(2, -2), atol=1e-6)
    with pytest.raises(ValueError, match="stage must be an int"):
        s.renoise(z, 4, n)


@pytest.mark.parametrize("gamma", [-0.34, -0.5, -1.0, float("-inf"), 0.0, float("nan")])
def test_gamma_outside_the_block_noise_range_is_refused(gamma):
    """Below -1/3 the block covariance is not positive definite: refused up front, not at stage 1's Cholesky."""
    with pytest.raises(ValueError, match="gamma must be in"):
        PixelFlowScheduler(gamma=gamma)


def test_gamma_of_minus_a_third_in_float32_draws_block_noise():
    s = PixelFlowScheduler(gamma=torch.tensor(-1 / 3).item())  # -0.33333334: a hair below -1/3
    assert torch.isfinite(s.block_noise_cholesky()).all()
    with pytest.raises(ValueError, match=r"num_stages=5 exceeds num_train_timesteps=4"):
        PixelFlowScheduler(num_train_timesteps=4, num_stages=5)
