"""Caption features for text-to-image training: T5 features computed on the fly or cached on disk.

Features are kept unpadded per caption and padded to the longest caption of each batch; the padding
mask makes that exact (a caption's features do not depend on how far it is padded). The cache stores them in
the encoder's own precision (bfloat16 on CUDA), so a run trains on the same numbers with or without it, and
keys its folder by the encoder's name, width, precision, max_length and a sample of its weights: another encoder
never reads features it did not make.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from .checkpoint import atomic_save
from .text import encode_text, load_text_encoder, text_encoder_settings


def spread_indices(numel: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """min(count, numel) evenly spaced indices into numel elements, first and last included. Integer
    arithmetic: a float32 linspace rounds numel - 1 up past the end above 2**24 (T5-XL's embedding table)."""
    k = min(count, numel)
    return torch.arange(k, device=device) * (numel - 1) // max(k - 1, 1)


def encoder_fingerprint(encoder: torch.nn.Module, max_length: int) -> str:
    """12 hex digits from the encoder's width, dtype, parameter names and shapes, and 64 evenly spaced values
    of each parameter (exact bytes, cheap even for T5-XL): a retrained or other encoder gets another cache."""
    h = hashlib.sha256(f"{getattr(getattr(encoder, 'config', None), 'd_model', None)}|{max_length}".encode())
    for name, p in encoder.named_parameters():
        flat = p.detach().reshape(-1)
        picks = spread_indices(flat.numel(), 64, flat.device)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(flat[picks].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


class TextFeatures:
    """T5 features of a batch's captions for training, optionally cached on disk per (dataset index, caption).

    Called with captions (B strings), indices (B,) dataset indices and dropped (B,) bool (label dropout):
    returns features (B, L, C) float32 padded to the longest caption and mask (B, L), 1 = token.
    """

    def __init__(self, config: DictConfig, device: torch.device, output_dir: Path):
        name, self.max_length = text_encoder_settings(config)
        feature_dim = config.model.params.get("cross_attention_dim")
        self.encoder, self.tokenizer = load_text_encoder(name, device=device, feature_dim=feature_dim)
        self.device = device
        self.cache_dir = None
        self.store_dtype = next(self.encoder.parameters()).dtype  # features are exact in it
        if config.data.get("cache_text_features", False):
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            self.cache_dir = (Path(output_dir) / "text_cache" /
                              f"{slug}-{self.max_length}-{encoder_fingerprint(self.encoder, self.max_length)}")
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.empty = self._encode([""])[0]

    def _encode(self, captions: list[str]) -> list[torch.Tensor]:
        features, mask = encode_text(self.encoder, self.tokenizer, captions, self.max_length, self.device)
        return [f[: int(m.sum())] for f, m in zip(features, mask)]

    def _cached(self, captions: list[str], indices: list[int]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(captions)
        missing = []
        paths = [self._cache_path(i, c) for i, c in zip(indices, captions)]
        for i, path in enumerate(paths):
            if path.is_file():
                out[i] = torch.load(path, map_location=self.device, weights_only=True).float()
            else:
                missing.append(i)
        if missing:
            for i, features in zip(missing, self._encode([captions[i] for i in missing])):
                stored = features.to(self.store_dtype)
                atomic_save(stored.cpu(), paths[i])
                out[i] = stored.float()  # what a later read of the cache gives (the same numbers)
        return out

    def _cache_path(self, index: int, caption: str) -> Path:
        """One file per (dataset index, caption): a changed captions file never reads stale features."""
        digest = hashlib.sha1(caption.encode("utf-8")).hexdigest()[:12]
        return self.cache_dir / f"{index:09d}-{digest}.pt"

    @torch.no_grad()
    def __call__(self, captions: list[str], indices: torch.Tensor, dropped: torch.Tensor):
        """Features (B, Lmax, C) float32 and mask (B, Lmax); dropped captions get the empty prompt's."""
        keep = [i for i, d in enumerate(dropped.tolist()) if not d]
        features: list[torch.Tensor] = [self.empty] * len(captions)
        if keep:
            texts = [captions[i] for i in keep]
            encoded = (self._cached(texts, [int(indices[i]) for i in keep]) if self.cache_dir is not None
                       else self._encode(texts))
            for i, f in zip(keep, encoded):
                features[i] = f
        longest = max(f.shape[0] for f in features)
        batch = torch.zeros(len(features), longest, features[0].shape[-1], device=self.device)
        mask = torch.zeros(len(features), longest, dtype=torch.long, device=self.device)
        for i, f in enumerate(features):
            batch[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
        return batch, mask
