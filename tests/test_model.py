"""Unit tests of the network and of checkpoint loading: sizes, init, gradients, packing, weight files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pixelflow.checkpoint import load_pretrained
from pixelflow.model import PixelFlowModel

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

REPO_ROOT = Path(__file__).resolve().parent.parent
C2I_CKPT = REPO_ROOT / "tests" / "golden" / "c2i_ckpt"
XL_C2I = "pixelflow_xl_c2i"
XL_T2I = "pixelflow_xl_t2i_crossdim2048"
XL_COUNTS = {XL_C2I: 676_611_120, XL_T2I: 882_122_160}  # SPEC section 3
XL_CONFIGS = {XL_C2I: "pixelflow_xl_c2i.yaml", XL_T2I: "pixelflow_xl_t2i.yaml"}


@pytest.fixture(scope="module")
def full_size(golden_dir):
    with open(golden_dir / "full_size_state_dicts.json") as f:
        return json.load(f)


def meta_model(params: dict) -> PixelFlowModel:
    with torch.device("meta"):
        return PixelFlowModel(**params)


def assert_matches_release_layout(model: PixelFlowModel, entry: dict, expected_count: int) -> None:
    assert sum(p.numel() for p in model.parameters()) == expected_count == entry["num_parameters"]
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == list(entry["state_dict"].items())  # same keys, same order, same shapes


# ---------------------------------------------------------------------------------------------- full size
@pytest.mark.parametrize("name", [XL_C2I, XL_T2I])
def test_xl_model_has_the_released_size_and_keys(full_size, name):
    entry = full_size[name]
    assert_matches_release_layout(meta_model(entry["params"]), entry, XL_COUNTS[name])


@pytest.mark.parametrize("name", [XL_C2I, XL_T2I])
def test_xl_config_file_builds_the_released_model(full_size, name):
    config = OmegaConf.load(REPO_ROOT / "configs" / XL_CONFIGS[name])
    assert config.model.target == "pixelflow.model.PixelFlowModel"
    params = OmegaConf.to_container(config.model.params, resolve=True)
    assert params == full_size[name]["params"]
    assert_matches_release_layout(meta_model(params), full_size[name], XL_COUNTS[name])


# ---------------------------------------------------------------------------------------------- init
def text_inputs(batch: int, dim: int = 12, length: int = 5) -> dict:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length - 2:] = 0
    return {"encoder_hidden_states": torch.randn(batch, length, dim), "encoder_attention_mask": mask}


@pytest.mark.parametrize("text", [False, True], ids=["c2i", "t2i"])
def test_fresh_model_outputs_exactly_zero(make_tiny_model, text):
    model = make_tiny_model(text=text)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    conditions = text_inputs(3) if text else {"class_labels": torch.tensor([0, 7, 10])}
    with torch.no_grad():
        out = model(x, torch.tensor([0.0, 400.0, 999.0]), **conditions)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0
    # Not zero because the network is dead: the adaLN-Zero layers are the only zeroed weights.
    assert model.patch_embed.proj.weight.abs().sum() > 0
    assert model.transformer_blocks[0].attn1.q_proj.weight.abs().sum() > 0


@pytest.mark.parametrize("text", [False, True], ids=["c2i", "t2i"])
def test_every_parameter_gets_a_gradient(make_tiny_model, text):
    model = make_tiny_model(text=text).train()
    torch.manual_seed(2)
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    timestep = torch.tensor([10.0, 250.0, 600.0, 990.0])
    conditions = text_inputs(4) if text else {"class_labels": torch.tensor([1, 2, 3, 10])}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def loss_and_grads() -> float:
        optimizer.zero_grad()
        loss = (model(x, timestep, **conditions) - target).pow(2).mean()
        loss.backward()
        return loss.item()

    # adaLN-Zero gates the path to most weights at init; a few steps open every gate.
    first = loss_and_grads()
    for _ in range(3):
        optimizer.step()
        last = loss_and_grads()
    assert last < first
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# ---------------------------------------------------------------------------------------------- packing
def to_tokens(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), tokens row-major, features (channel, row-in-patch, col-in-patch)."""
    b, c, h, w = images.shape
    patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c * p * p)


@pytest.mark.parametrize("text", [False, True], ids=["c2i", "t2i"])
def test_packed_forward_equals_dense_forward_per_image(c2i_model, t2i_model, text):
    model = t2i_model if text else c2i_model
    p = model.patch_size
    grid_sizes = [16, 8, 8, 4]
    torch.manual_seed(3)
    images = [torch.randn(1, 3, g * p, g * p) for g in grid_sizes]
    timestep = torch.tensor([100.0, 420.0, 420.0, 870.0])
    if text:
        features = text_inputs(len(grid_sizes), dim=model.cross_attention_dim, length=7)
        per_image = [{k: v[i:i + 1] for k, v in features.items()} for i in range(len(grid_sizes))]
        packed_conditions = features
    else:
        labels = torch.tensor([5, 999, 1000, 3])
        per_image = [{"class_labels": labels[i:i + 1]} for i in range(len(grid_sizes))]
        packed_conditions = {"class_labels": labels}

    model.train()  # packed sequences are the training path
    with torch.no_grad():
        packed = model(torch.cat([to_tokens(x, p)[0] for x in images]), timestep, grid_sizes=grid_sizes,
                       **packed_conditions)
        model.eval()
        dense = [to_tokens(model(x, timestep[i:i + 1], **per_image[i]), p)[0] for i, x in enumerate(images)]
    assert packed.shape == (sum(g * g for g in grid_sizes), 3 * p * p)
    expected = torch.cat(dense)
    assert (packed - expected).abs().max().item() < 1e-5
    assert expected.abs().max().item() > 1e-2  # the comparison is between non-trivial outputs


# ---------------------------------------------------------------------------------------------- weight files
def golden_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(C2I_CKPT / "model.pt", map_location="cpu", weights_only=True)


def checkpoint_folder(tmp_path, name: str, write) -> str:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(C2I_CKPT / "config.yaml", folder / "config.yaml")
    write(folder)
    return folder


def reference_output(model: PixelFlowModel) -> torch.Tensor:
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        return model(x, torch.tensor([30.0, 700.0]), class_labels=torch.tensor([12, 1000]))


def save_flat(folder):
    torch.save(golden_state_dict(), folder / "model.pt")


def save_wrapped_model(folder):
    torch.save({"model": golden_state_dict()}, folder / "model.pt")


def save_wrapped_ema(folder):
    torch.save({"ema": golden_state_dict()}, folder / "model.pt")


def save_ema_beside_other_weights(folder):
    # A training checkpoint may hold both; the EMA weights are the ones to sample with.
    other = {k: torch.zeros_like(v) for k, v in golden_state_dict().items()}
    torch.save({"model": other, "ema": golden_state_dict()}, folder / "model.pt")


def save_safetensors(folder):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in golden_state_dict().items()}, str(folder / "model.safetensors"))


def save_from_compiled_ddp_model(folder):
    # state_dict() of DDP(torch.compile(model)): every key starts with "module._orig_mod."
    torch.save({f"module._orig_mod.{k}": v for k, v in golden_state_dict().items()}, folder / "model.pt")


@pytest.mark.parametrize("write", [save_flat, save_wrapped_model, save_wrapped_ema, save_ema_beside_other_weights,
                                   save_safetensors, save_from_compiled_ddp_model], ids=lambda f: f.__name__)
def test_checkpoint_formats_load_to_identical_models(tmp_path, c2i_model, write):
    folder = checkpoint_folder(tmp_path, write.__name__, write)
    model, config = load_pretrained(folder)
    assert not model.training
    assert config.model.params.num_classes == 1000
    expected = c2i_model.state_dict()
    assert list(model.state_dict()) == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    # Bit-identical weights; safetensors hands back unaligned storage, which may change BLAS rounding.
    assert (reference_output(model) - reference_output(c2i_model)).abs().max().item() < 1e-6


def test_checkpoint_folder_without_config_is_rejected(tmp_path):
    folder = tmp_path / "no_config"
    folder.mkdir()
    torch.save(golden_state_dict(), folder / "model.pt")
    with pytest.raises(ValueError, match=r"no_config.*config\.yaml"):
        load_pretrained(folder)


def test_checkpoint_folder_without_weights_is_rejected(tmp_path):
    folder = checkpoint_folder(tmp_path, "no_weights", lambda folder: None)
    with pytest.raises(ValueError, match=r"no_weights.*model\.pt"):
        load_pretrained(folder)


def test_weights_with_a_missing_key_are_rejected(tmp_path):
    def write(folder):
        state = golden_state_dict()
        del state["transformer_blocks.1.attn1.k_norm.weight"]
        torch.save(state, folder / "model.pt")

    with pytest.raises(ValueError, match=r"missing.*transformer_blocks\.1\.attn1\.k_norm\.weight"):
        load_pretrained(checkpoint_folder(tmp_path, "missing", write))


def test_weights_with_an_unexpected_key_are_rejected(tmp_path):
    def write(folder):
        state = golden_state_dict()
        state["transformer_blocks.2.norm1.linear.weight"] = torch.zeros(3)
        torch.save(state, folder / "model.pt")

    with pytest.raises(ValueError, match=r"unexpected.*transformer_blocks\.2\.norm1\.linear\.weight"):
        load_pretrained(checkpoint_folder(tmp_path, "unexpected", write))


def test_weights_of_another_shape_are_named_as_a_weights_error(tmp_path):
    from pixelflow.checkpoint import WeightsError

    def write(folder):
        state = golden_state_dict()
        state["proj_out_2.weight"] = state["proj_out_2.weight"][:-1]
        torch.save(state, folder / "model.pt")

    with pytest.raises(WeightsError, match=r"shape mismatches \(1\).*proj_out_2\.weight"):
        load_pretrained(checkpoint_folder(tmp_path, "shape", write))


def test_half_precision_weights_load_into_a_float32_model(tmp_path):
    """A checkpoint saved in bfloat16 loads as the config's float32 model, not as a bfloat16 one."""
    def write(folder):
        torch.save({k: v.to(torch.bfloat16) for k, v in golden_state_dict().items()}, folder / "model.pt")

    model, _ = load_pretrained(checkpoint_folder(tmp_path, "bf16", write))
    golden = golden_state_dict()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(v, golden[k].to(torch.bfloat16).float()) for k, v in model.state_dict().items())


def test_packed_attention_uses_flash_attn_varlen_when_eligible(monkeypatch):
    """With flash-attn installed and CUDA bf16 tensors, packed self-attention goes through its varlen kernel
    with the layout's cu_seqlens; here a stand-in kernel (exact SDPA per image) checks the call on the CPU."""
    import torch.nn.functional as F
    from pixelflow.model import attention

    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append((cu_q.tolist(), max_q))
        out = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
               for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]
        return torch.cat(out)

    torch.manual_seed(0)
    model = PixelFlowModel(num_attention_heads=2, attention_head_dim=8, depth=2, patch_size=2, num_classes=4)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    grids = [4, 2, 2, 1]
    tokens = torch.randn(sum(g * g for g in grids), 12)
    args = (tokens, torch.tensor([10.0, 200.0, 500.0, 900.0]))
    kwargs = dict(class_labels=torch.tensor([0, 1, 2, 4]), grid_sizes=grids)
    with torch.no_grad():
        reference = model(*args, **kwargs)
        monkeypatch.setattr(attention, "_flash_attn_varlen", lambda: fake_varlen)
        monkeypatch.setattr(attention, "_flash_eligible", lambda q: True)
        flashed = model(*args, **kwargs)
    assert calls and calls[0] == ([0, 16, 20, 24, 25], 16)
    assert len(calls) == 2  # once per block
    assert (flashed - reference).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(class_labels=torch.tensor([0, 5])), r"class label 5 is outside \[0, 4\]", id="label-5"),
    pytest.param(dict(class_labels=torch.tensor([0, -1])), r"class label -1", id="label-minus-1"),
    pytest.param(dict(class_labels=torch.tensor([1])), r"class_labels must be \(2,\).*\(1,\)", id="one-label"),
    pytest.param(dict(class_labels=torch.tensor([0.0, 1.0])), r"integers.*float32", id="float-labels"),
    pytest.param(dict(class_labels=torch.tensor([0, 1]), timestep=torch.ones(3)), r"timestep.*\(2,\).*\(3,\)",
                 id="timestep-length"),
    pytest.param(dict(class_labels=torch.tensor([0, 1]), encoder_hidden_states=torch.zeros(2, 3, 8)),
                 r"class-conditional.*encoder_hidden_states", id="text-to-c2i"),
    pytest.param(dict(class_labels=torch.tensor([0, 1]), encoder_attention_mask=torch.ones(2, 3)),
                 r"class-conditional.*encoder_attention_mask", id="mask-to-c2i"),
])
def test_forward_names_bad_conditions(make_tiny_model, kwargs, message):
    model = make_tiny_model(num_classes=4)
    kwargs = dict(kwargs)
    timestep = kwargs.pop("timestep", torch.ones(2))
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(2, 3, 8, 8), timestep, **kwargs)
    # The null label (num_classes) is the network's own and is accepted.
    model(torch.zeros(2, 3, 8, 8), torch.ones(2), class_labels=torch.tensor([0, 4]))


def test_a_forward_under_inference_mode_leaves_training_possible(make_tiny_model):
    """The RoPE table cached by an inference_mode forward is not reused where autograd must save it."""
    model = make_tiny_model()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    with torch.inference_mode():
        expected = model(x, torch.full((2,), 5.0), class_labels=y)
    out = model(x, torch.full((2,), 5.0), class_labels=y)
    out.sum().backward()
    assert torch.equal(out.detach(), expected)
    assert model.transformer_blocks[0].attn1.q_proj.weight.grad is not None
