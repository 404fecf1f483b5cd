"""Shared fixtures: the golden reference data, the golden tiny pipelines and tiny model builders.

Loading is session-scoped so each checkpoint is read once for the whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from pixelflow.model import PixelFlowModel
from pixelflow.pipeline import PixelFlowPipeline
from pixelflow.text import build_tiny_text_encoder

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
C2I_CKPT = GOLDEN_DIR / "c2i_ckpt"
T2I_CKPT = GOLDEN_DIR / "t2i_ckpt"
T2I_TEXT_DIM = 24          # cross_attention_dim of golden t2i_ckpt
T2I_MAX_TEXT_LENGTH = 16   # short token budget so the tiny text pipeline stays fast


@pytest.fixture(scope="module")
def single_threaded_torch():
    """One intra-op thread for the module, restored afterwards. The networks here are tiny: a second thread
    buys nothing, and on a busy 2-core machine OpenMP's spin-waiting makes such runs ~10x slower.
    Opt in with `pytestmark = pytest.mark.usefixtures("single_threaded_torch")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def load_golden() -> Callable[[str], object]:
    """load_golden("scheduler.pt") -> the file's contents, read once per session."""
    cache: dict[str, object] = {}

    def load(name: str):
        if name not in cache:
            cache[name] = torch.load(GOLDEN_DIR / name, weights_only=True)
        return cache[name]

    return load


@pytest.fixture(scope="session")
def c2i_pipe() -> PixelFlowPipeline:
    """Pipeline of the golden class-to-image checkpoint (4 stages, patch 2, 32 px, eval mode)."""
    return PixelFlowPipeline.from_pretrained(C2I_CKPT, device="cpu")


@pytest.fixture(scope="session")
def tiny_text_encoder():
    """(encoder, tokenizer): the fixed-seed tiny T5 whose width matches golden t2i_ckpt."""
    return build_tiny_text_encoder(d_model=T2I_TEXT_DIM)


@pytest.fixture(scope="session")
def t2i_pipe(tiny_text_encoder) -> PixelFlowPipeline:
    """Pipeline of the golden text-to-image checkpoint with the tiny T5; tests that change
    max_text_length must restore it (use monkeypatch.setattr)."""
    encoder, tokenizer = tiny_text_encoder
    pipe = PixelFlowPipeline.from_pretrained(T2I_CKPT, device="cpu", text_encoder=encoder, tokenizer=tokenizer)
    pipe.max_text_length = T2I_MAX_TEXT_LENGTH
    return pipe


TINY_C2I_PARAMS = dict(in_channels=3, out_channels=3, num_attention_heads=2, attention_head_dim=8, depth=2,
                       patch_size=2, num_classes=10, attention_bias=True)
TINY_T2I_PARAMS = dict(TINY_C2I_PARAMS, num_classes=0, cross_attention_dim=12)


@pytest.fixture
def make_tiny_model() -> Callable[..., PixelFlowModel]:
    """make_tiny_model(text=False, seed=0, **overrides) -> a freshly initialised tiny PixelFlowModel."""

    def make(text: bool = False, seed: int = 0, **overrides) -> PixelFlowModel:
        params = dict(TINY_T2I_PARAMS if text else TINY_C2I_PARAMS, **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return PixelFlowModel(**params)

    return make


def seeded_generators(*seeds: int) -> list[torch.Generator]:
    """One CPU generator per seed."""
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="session")
def generators() -> Callable[..., list[torch.Generator]]:
    return seeded_generators


@pytest.fixture
def c2i_model():
    """A fresh copy of the golden class-to-image network (eval mode); tests may switch its mode freely."""
    from pixelflow.checkpoint import load_pretrained

    model, _ = load_pretrained(C2I_CKPT, device="cpu")
    return model


@pytest.fixture
def t2i_model():
    """A fresh copy of the golden text-to-image network (eval mode, cross_attention_dim 24)."""
    from pixelflow.checkpoint import load_pretrained

    model, _ = load_pretrained(T2I_CKPT, device="cpu")
    return model
