"""Every golden file of the original release (tests/golden, see its README) reproduced on the CPU in float32.

collate.pt (training targets) is covered by the training tests.
"""

from __future__ import annotations

import pytest
import torch

from pixelflow.model.embeddings import rope_2d, sinusoid_embedding
from pixelflow.scheduler import PixelFlowScheduler

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

FORWARD_ATOL = 1e-5   # README: forward outputs to about 1e-5
SAMPLING_ATOL = 1e-4  # README: whole sampling runs to about 1e-4
TABLE_ATOL = 1e-9     # scheduler tables are float64
FLOAT32_EPS = 2.0 ** -23


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------- embeddings
def test_sinusoid_embedding_matches_release(load_golden):
    golden = load_golden("embeddings.pt")
    timesteps, expected = golden["timesteps"], golden["timestep_proj_256"]
    ours = sinusoid_embedding(timesteps)
    assert ours.shape == expected.shape == (5, 256)
    assert ours.dtype == torch.float32
    for row, T in enumerate(timesteps.tolist()):
        # The release's CPU exp rounds a few frequencies one float32 ulp differently, which moves an angle of
        # size up to T by one ulp (T * 2^-23): ~1.5e-5 at T=250 and ~6e-5 at T=999 on this machine.
        tol = 1e-6 + T * FLOAT32_EPS
        err = max_abs(ours[row], expected[row])
        assert err < tol, f"T={T}: max error {err:.3g} >= {tol:.3g}"
    # And all but a handful of entries agree much more tightly than that bound.
    assert ((ours - expected).abs() > 1e-6).sum().item() <= 16


@pytest.mark.parametrize("head_dim", [16, 72])
@pytest.mark.parametrize("side", [1, 2, 3, 8])
def test_rope_table_matches_release(load_golden, head_dim, side):
    expected = load_golden("embeddings.pt")[f"rope_hd{head_dim}_n{side}"]
    ours = rope_2d(side, side, head_dim)
    assert ours.shape == expected.shape == (side * side, head_dim, 2)
    assert max_abs(ours, expected) < 1e-6


# ---------------------------------------------------------------------------------------------- scheduler
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_scheduler_stage_tables_match_release(load_golden, num_stages):
    golden = load_golden("scheduler.pt")[f"stages{num_stages}"]
    scheduler = PixelFlowScheduler(num_train_timesteps=1000, num_stages=num_stages, gamma=-1 / 3)
    for name in ("start_t", "end_t", "original_start_t"):
        ours = getattr(scheduler, name)
        assert len(ours) == num_stages
        assert ours == pytest.approx(golden[name], abs=TABLE_ATOL), name
    for stage in range(num_stages):
        for ours, expected in ((scheduler.timesteps_per_stage[stage], golden["Timesteps_per_stage"][stage]),
                               (scheduler.t_window_per_stage[stage], golden["t_window_per_stage"][stage])):
            assert ours.dtype == torch.float64 and ours.shape == expected.shape == (1000,)
            assert (ours - expected).abs().max().item() < TABLE_ATOL


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_scheduler_set_timesteps_matches_release(load_golden, num_stages):
    entries = load_golden("scheduler.pt")[f"stages{num_stages}"]["set_timesteps"]
    assert len(entries) == 8 * num_stages  # n in (1, 2, 10, 30) x shift in (1, 3) x stages
    scheduler = PixelFlowScheduler(num_train_timesteps=1000, num_stages=num_stages)
    for n in (1, 2, 10, 30):
        for shift in (1.0, 3.0):
            for stage in range(num_stages):
                expected = entries[f"n{n}_shift{shift}_stage{stage}"]
                scheduler.set_timesteps(n, stage, shift=shift)
                assert scheduler.timesteps.shape == (n,) and scheduler.t.shape == (n + 1,)
                assert (scheduler.timesteps.double() - expected["Timesteps"]).abs().max().item() < TABLE_ATOL
                assert (scheduler.t.double() - expected["t"]).abs().max().item() < TABLE_ATOL


# ---------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("resolution", ["res8", "res32"])
def test_c2i_forward_matches_release(load_golden, c2i_model, resolution):
    case = load_golden("c2i_forward.pt")[resolution]
    x = case["hidden_states"]
    side = x.shape[-1] // c2i_model.patch_size
    assert side == case["latent_size"].item()
    assert max_abs(c2i_model.rope_table(side), case["pos_embed"]) < 1e-6
    with torch.no_grad():
        out = c2i_model(x, case["timestep"], class_labels=case["class_labels"])
    assert out.shape == case["output"].shape
    assert max_abs(out, case["output"]) < FORWARD_ATOL


def test_c2i_packed_training_forward_matches_release(load_golden, c2i_model):
    case = load_golden("c2i_forward_packed.pt")
    grid_sizes = case["latent_size"].tolist()
    assert [g * c2i_model.patch_size for g in grid_sizes] == case["image_sizes"]
    expected_rope = torch.cat([c2i_model.rope_table(g) for g in grid_sizes])
    assert max_abs(expected_rope, case["pos_embed"]) < 1e-6
    c2i_model.train()
    with torch.no_grad():
        out = c2i_model(case["hidden_states"], case["timestep"], class_labels=case["class_labels"],
                        grid_sizes=grid_sizes)
    assert out.shape == case["output"].shape == (sum(case["seqlens"]), 12)
    assert max_abs(out, case["output"]) < FORWARD_ATOL


def test_t2i_forward_matches_release_and_needs_the_mask(load_golden, t2i_model):
    case = load_golden("t2i_forward.pt")
    mask = case["encoder_attention_mask"]
    assert (mask == 0).any(), "the golden case must contain padding for the mask to matter"
    with torch.no_grad():
        out = t2i_model(case["hidden_states"], case["timestep"], encoder_hidden_states=case["encoder_hidden_states"],
                        encoder_attention_mask=mask)
        unmasked = t2i_model(case["hidden_states"], case["timestep"],
                             encoder_hidden_states=case["encoder_hidden_states"])
    assert max_abs(out, case["output"]) < FORWARD_ATOL
    # Padding tokens must be ignored: attending to them gives a visibly different velocity.
    assert max_abs(unmasked, case["output"]) > 1e-2


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", ["euler_cfg", "euler_shift", "dopri5"])
def test_pipeline_run_matches_release(load_golden, c2i_pipe, name):
    run = load_golden(f"pipeline_{name}.pt")
    samples = c2i_pipe(class_labels=run["labels"], height=32, width=32, num_inference_steps=run["steps"],
                       guidance_scale=run["cfg"], shift=run["shift"],
                       solver="dopri5" if run["dopri5"] else "euler",
                       latents=run["initial_noise"], stage_noise=run["block_noise"], output_type="pt")
    assert samples.shape == run["samples"].shape
    assert max_abs(samples, run["samples"]) < SAMPLING_ATOL
