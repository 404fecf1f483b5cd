"""Text conditioning: a T5 encoder (transformers) and its tokenizer.

The release uses google/flan-t5-xl with 512 tokens and passes the padding mask to cross-attention.
For CPU work without downloads, `name: tiny-random-t5` builds a small T5 from a T5Config with fixed-seed
random weights and a byte-level tokenizer: the same every time it is built, so a checkpoint trained
with it samples the same way later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the pipeline imports this module, and sampling alone needs no omegaconf
    from omegaconf import DictConfig

DEFAULT_TEXT_ENCODER = "google/flan-t5-xl"
DEFAULT_MAX_LENGTH = 512
TINY_RANDOM_T5 = "tiny-random-t5"
TINY_T5_SEED = 1234


def text_encoder_settings(config: DictConfig) -> tuple[str, int]:
    """(encoder name, max token length) from config.text_encoder, with the release's defaults."""
    section = config.get("text_encoder", None) or {}
    name, max_length = section.get("name", DEFAULT_TEXT_ENCODER), section.get("max_length", DEFAULT_MAX_LENGTH)
    if not isinstance(name, str) or not name:
        raise ValueError(f"text_encoder.name={name!r} must be a hub id or a local folder, "
                         f"e.g. {DEFAULT_TEXT_ENCODER!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"text_encoder.max_length={max_length!r} must be an int >= 1 (tokens per caption; "
                         f"the release uses {DEFAULT_MAX_LENGTH})")
    return name, max_length


def check_text_width(text_encoder, feature_dim: int | None, name: str) -> None:
    """The encoder's feature width (T5's d_model) must be the model's cross_attention_dim."""
    width = getattr(getattr(text_encoder, "config", None), "d_model", None)
    if feature_dim is not None and width is not None and width != feature_dim:
        raise ValueError(f"the text encoder gives {width}-wide features (d_model) but the model's "
                         f"cross_attention_dim is {feature_dim}: text_encoder.name {name!r} does not fit this model")


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 2), 1 = end of text, 0 = padding; a tokenizer with no vocab file."""

    pad_token_id, eos_token_id, offset = 0, 1, 2
    vocab_size = 256 + 2

    def __call__(self, texts, padding="max_length", max_length=512, truncation=True, return_tensors="pt", **_):
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = []
        for text in texts:
            ids = [b + self.offset for b in text.encode("utf-8")]
            if truncation:
                ids = ids[: max_length - 1]
            rows.append(ids + [self.eos_token_id])
        length = max_length if padding == "max_length" else max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def build_tiny_text_encoder(d_model: int = 32, num_layers: int = 2, num_heads: int = 2):
    """A small random T5 encoder and a ByteTokenizer, identical on every call (fixed seed)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=d_model, d_kv=d_model // num_heads,
                      d_ff=2 * d_model, num_layers=num_layers, num_heads=num_heads,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_T5_SEED)
        encoder = T5EncoderModel(config)
    return encoder.eval(), ByteTokenizer()


def load_text_encoder(name: str, device: torch.device | str = "cpu", text_encoder=None, tokenizer=None,
                      feature_dim: int | None = None):
    """(text_encoder, tokenizer), loading only what is not given: the tiny random T5 for TINY_RANDOM_T5 (width
    feature_dim), else transformers' T5 by name (a hub id or a local folder), in bfloat16 on CUDA and float32
    elsewhere. The encoder is put on `device` in eval mode without grads (T5's dropout would otherwise change
    the features every call), and its width is checked against feature_dim."""
    device = torch.device(device)
    if text_encoder is None or tokenizer is None:
        if name == TINY_RANDOM_T5:
            tiny_encoder, tiny_tokenizer = build_tiny_text_encoder(d_model=feature_dim or 32)
            text_encoder = tiny_encoder if text_encoder is None else text_encoder
            tokenizer = tiny_tokenizer if tokenizer is None else tokenizer
        else:
            from transformers import AutoTokenizer, T5EncoderModel
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            if text_encoder is None:
                text_encoder = _load_named("text encoder", name, T5EncoderModel, torch_dtype=dtype)
            if tokenizer is None:
                tokenizer = _load_named("tokenizer", name, AutoTokenizer)
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    check_text_width(text_encoder, feature_dim, name)
    return text_encoder, tokenizer


def _load_named(what: str, name: str, loader, **kwargs):
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # no such folder, not in the hub cache while offline, not a T5
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what} {name!r} could not be loaded: give a local folder holding a T5 encoder and its "
                         f"tokenizer, or a hub id already in the cache ({reason})") from e


@torch.no_grad()
def encode_text(text_encoder, tokenizer, prompts: list[str], max_length: int,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts -> (features (B, max_length, C) float32, mask (B, max_length) long, 1 = token)."""
    if not prompts:
        raise ValueError("no prompts to encode: pass at least one prompt")
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    encoder_device = next(text_encoder.parameters()).device
    features = text_encoder(input_ids=ids.to(encoder_device), attention_mask=mask.to(encoder_device)).last_hidden_state
    return features.float().to(device), mask
