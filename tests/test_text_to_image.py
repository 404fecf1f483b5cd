"""Text-to-image: T5 conditioning, the released layout, and training on an image-caption folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pixelflow.config import load_config
from pixelflow.data import CaptionDataset, Preprocess, write_synthetic_captions
from pixelflow.pipeline import PixelFlowPipeline
from pixelflow.text import build_tiny_text_encoder
from pixelflow.training import TRAINING_STATE, TrainOptions, Trainer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
TINY = ["model.params.depth=1", "data.batch_size=8", "data.resolution=16", "data.num_workers=0",
        "preview.num_inference_steps=1", "preview.images_per_class=1", "text_encoder.max_length=16"]


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return write_synthetic_captions(tmp_path_factory.mktemp("captions"), count=48, resolution=16)


def t2i_config(root: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny_t2i.yaml", [f"data.root={root}", *TINY, *overrides])


def test_released_wrapped_layout_loads(tmp_path):
    """The text-to-image release wraps its weights as {"model": state_dict}."""
    shutil.copy(GOLDEN / "t2i_ckpt" / "config.yaml", tmp_path / "config.yaml")
    state = torch.load(GOLDEN / "t2i_ckpt" / "model.pt", weights_only=True)
    torch.save({"model": dict(state)}, tmp_path / "model.pt")
    encoder, tokenizer = build_tiny_text_encoder(d_model=24)
    pipe = PixelFlowPipeline.from_pretrained(tmp_path, text_encoder=encoder, tokenizer=tokenizer)
    golden = torch.load(GOLDEN / "t2i_forward.pt", weights_only=True)
    with torch.no_grad():
        out = pipe.model(golden["hidden_states"], golden["timestep"],
                         encoder_hidden_states=golden["encoder_hidden_states"],
                         encoder_attention_mask=golden["encoder_attention_mask"])
    assert (out - golden["output"]).abs().max() < 1e-5


def test_config_names_its_text_encoder(tmp_path):
    """A checkpoint whose config names the tiny random T5 loads with no encoder passed in."""
    shutil.copy(GOLDEN / "t2i_ckpt" / "model.pt", tmp_path / "model.pt")
    config = OmegaConf.load(GOLDEN / "t2i_ckpt" / "config.yaml")
    config.text_encoder = {"name": "tiny-random-t5", "max_length": 16}
    OmegaConf.save(config, tmp_path / "config.yaml")
    pipe = PixelFlowPipeline.from_pretrained(tmp_path)
    assert pipe.max_text_length == 16
    a = pipe(prompt=["a red disc", "a blue ring"], num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    b = pipe(prompt=["a red disc", "a blue ring"], num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 32, 32, 3) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="empty list"):
        pipe(prompt=[], num_inference_steps=1)


def test_text_encoder_width_and_max_length_are_checked(captions):
    from pixelflow.config import validate_train_config
    from pixelflow.text import ByteTokenizer, load_text_encoder
    wide, _ = build_tiny_text_encoder(d_model=48)
    with pytest.raises(ValueError, match="48-wide features .* cross_attention_dim is 32: text_encoder.name 'my-t5'"):
        load_text_encoder("my-t5", text_encoder=wide, tokenizer=ByteTokenizer(), feature_dim=32)  # training's path
    for value in ("0", "abc"):
        with pytest.raises(ValueError, match=f"text_encoder.max_length=.*{value}.* must be an int >= 1"):
            validate_train_config(t2i_config(captions, f"text_encoder.max_length={value}"))


def test_cache_fingerprint_samples_stay_inside_large_tensors():
    from pixelflow.text_features import spread_indices
    numel = 32128 * 2048  # flan-t5-xl's embedding table: a float32 linspace would give index numel
    picks = spread_indices(numel, 64)
    assert picks[0] == 0 and picks[-1] == numel - 1 and len(picks) == 64 and (picks.diff() > 0).all()
    assert spread_indices(5, 64).tolist() == [0, 1, 2, 3, 4] and spread_indices(1, 64).tolist() == [0]


def test_caption_folder_errors(tmp_path, captions):
    preprocess = Preprocess(16)
    odd = tmp_path / "odd"
    shutil.copytree(captions / "images", odd / "images")
    rows = [json.dumps({"file": "images/000000.png", "caption": "a red disc"}),
            json.dumps({"file": "images/000001.png", "caption": "line\u2028two"}, ensure_ascii=False)]
    (odd / "captions.jsonl").write_text("\ufeff" + "\r\n".join(rows) + "\r\n", encoding="utf-8")  # Notepad-style
    assert [c for _, c in CaptionDataset(odd, "captions.jsonl", preprocess).samples] == ["a red disc", "line\u2028two"]
    (odd / "captions.jsonl").write_bytes('{"file": "images/000000.png", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        CaptionDataset(odd, "captions.jsonl", preprocess)
    (odd / "captions.jsonl").write_text('{"file": 5, "caption": "x"}\n')
    with pytest.raises(ValueError, match="captions.jsonl:1: file must be an image path"):
        CaptionDataset(odd, "captions.jsonl", preprocess)
    with pytest.raises(ValueError, match="captions file .*nope.jsonl.* does not exist"):
        CaptionDataset(captions, "nope.jsonl", preprocess)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captions.jsonl").write_text(json.dumps({"file": "missing.png", "caption": "a cat"}) + "\n")
    with pytest.raises(ValueError, match="'missing.png' does not exist"):
        CaptionDataset(bad, "captions.jsonl", preprocess)
    (bad / "captions.jsonl").write_text('{"file": "x.png"}\n')
    with pytest.raises(ValueError, match="captions.jsonl:1"):
        CaptionDataset(bad, "captions.jsonl", preprocess)
    with pytest.raises(ValueError, match="captions file"):
        Trainer(t2i_config(captions, "data.captions_file=nope.jsonl"), TrainOptions(str(tmp_path / "run")))


def test_train_resume_and_sample(tmp_path, captions):
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(t2i_config(captions, "train.max_steps=4"),
            TrainOptions(str(straight), checkpoint_steps=4, progress=False)).fit()
    Trainer(t2i_config(captions, "train.max_steps=2"), TrainOptions(str(split), checkpoint_steps=2, progress=False)).fit()
    Trainer(t2i_config(captions, "train.max_steps=4"),
            TrainOptions(str(split), resume=True, checkpoint_steps=2, progress=False)).fit()
    a = torch.load(straight / "checkpoints" / "0000004" / TRAINING_STATE, weights_only=True)["model"]
    b = torch.load(split / "checkpoints" / "0000004" / TRAINING_STATE, weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # The checkpoint samples from prompts with the text encoder its config names.
    pipe = PixelFlowPipeline.from_pretrained(split)
    images = pipe(prompt="a red disc", num_images_per_prompt=2, num_inference_steps=1, output_type="uint8")
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert (split / "samples" / "0000004.png").is_file()


def test_cached_text_features_match_on_the_fly(tmp_path, captions):
    config = t2i_config(captions, "train.max_steps=1")
    cached = Trainer(t2i_config(captions, "train.max_steps=1", "data.cache_text_features=true"),
                     TrainOptions(str(tmp_path / "cached"), progress=False))
    plain = Trainer(config, TrainOptions(str(tmp_path / "plain"), progress=False))
    captions_, indices = ["a red disc", "a blue triangle, longer"], torch.tensor([0, 2])
    dropped = torch.tensor([False, True])
    f1, m1 = cached.text(captions_, indices, dropped)
    f2, m2 = cached.text(captions_, indices, dropped)  # second call reads the cache
    f3, m3 = plain.text(captions_, indices, dropped)
    assert torch.equal(f1, f2) and torch.equal(m1, m2) and torch.equal(m1, m3)
    assert torch.equal(f1, f3)  # stored in the encoder's precision: the same numbers as on the fly
    assert m1[1].sum() == 1  # the dropped caption is the empty prompt: just the end token
    assert len(list(cached.text.cache_dir.glob("*.pt"))) == 1
    # Another encoder (here a wider one, for a wider model) gets its own cache folder, never these features.
    wide = Trainer(t2i_config(captions, "train.max_steps=1", "data.cache_text_features=true",
                              "model.params.cross_attention_dim=48"),
                   TrainOptions(str(tmp_path / "cached"), resume=True, progress=False))
    assert wide.text.cache_dir != cached.text.cache_dir
    assert wide.text(captions_, indices, dropped)[0].shape[-1] == 48


def test_text_cache_never_serves_the_features_of_an_edited_caption(tmp_path, captions):
    text = Trainer(t2i_config(captions, "train.max_steps=1", "data.cache_text_features=true"),
                   TrainOptions(str(tmp_path), progress=False)).text
    index, kept = torch.tensor([0]), torch.tensor([False])
    text(["a red disc"], index, kept)  # cached for image 0
    edited = "a blue square with a longer caption"  # the same image, its caption edited in the captions file
    cached, mask = text([edited], index, kept)
    expected = text._encode([edited])[0]
    assert int(mask.sum()) == expected.shape[0] and torch.equal(cached[0, : expected.shape[0]], expected)


def test_cached_captions_are_read_back_not_encoded_again(tmp_path, captions, monkeypatch):
    text = Trainer(t2i_config(captions, "train.max_steps=1", "data.cache_text_features=true"),
                   TrainOptions(str(tmp_path), progress=False)).text
    index, kept = torch.tensor([3]), torch.tensor([False])
    first = text(["a red disc"], index, kept)
    encoded = []
    monkeypatch.setattr(text, "_encode", lambda captions: encoded.append(captions) or [])
    again = text(["a red disc"], index, kept)
    assert encoded == [] and all(torch.equal(a, b) for a, b in zip(first, again))


def test_cache_fingerprint_follows_the_encoder_weights():
    from pixelflow.text_features import encoder_fingerprint
    encoder, _ = build_tiny_text_encoder(d_model=24)
    retrained, _ = build_tiny_text_encoder(d_model=24)
    assert encoder_fingerprint(encoder, 16) == encoder_fingerprint(retrained, 16)
    with torch.no_grad():
        retrained.shared.weight.mul_(1.01)  # same name, width and shapes; other weights
    assert encoder_fingerprint(encoder, 16) != encoder_fingerprint(retrained, 16)
    assert encoder_fingerprint(encoder, 16) != encoder_fingerprint(encoder, 32)


def test_a_misspelled_text_encoder_key_in_a_checkpoint_config_is_refused(tmp_path):
    """text_encoder.max_lenght would otherwise sample with the default 512 tokens the model was not trained on."""
    shutil.copy(GOLDEN / "t2i_ckpt" / "model.pt", tmp_path / "model.pt")
    config = OmegaConf.load(GOLDEN / "t2i_ckpt" / "config.yaml")
    config.text_encoder = {"name": "tiny-random-t5", "max_lenght": 16}
    OmegaConf.save(config, tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="unknown config key 'text_encoder.max_lenght'"):
        PixelFlowPipeline.from_pretrained(tmp_path)


def test_step_caption_features_follow_the_packed_order(tmp_path, captions):
    trainer = Trainer(t2i_config(captions, "train.max_steps=1", "train.label_dropout=0.0"),
                      TrainOptions(str(tmp_path), progress=False))
    texts = ["a red disc", "a green square on a grey floor", "blue", "a yellow triangle", "a purple ring",
             "cyan", "an orange cross, small", "a white diamond"]
    batch = {"images": torch.rand(8, 3, 16, 16) * 2 - 1, "captions": texts, "indices": torch.arange(8),
             "skipped": []}
    packed, kwargs = trainer._batch_inputs(batch, 0)
    assert not torch.equal(packed.order, torch.arange(8))  # packing reorders the images (finest stage first)
    features, mask = trainer.text(texts, torch.arange(8), torch.zeros(8, dtype=torch.bool))
    # Each packed image is conditioned on its own caption.
    assert torch.equal(kwargs["encoder_hidden_states"], features[packed.order])
    assert torch.equal(kwargs["encoder_attention_mask"], mask[packed.order])


@pytest.mark.slow
def test_tiny_text_to_image_loss_falls(tmp_path, captions):
    trainer = Trainer(t2i_config(captions, "train.max_steps=60", "model.params.depth=2"),
                      TrainOptions(str(tmp_path), checkpoint_steps=60, logging_steps=10, progress=False))
    trainer.fit()
    losses = [json.loads(r)["loss"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-2:]) < 0.7 * losses[0], losses
