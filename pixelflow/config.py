"""Training configs: the released keys, our additions with their defaults, overrides and checks.

A config is OmegaConf YAML. Unknown keys are errors, never ignored: a misspelled `train.max_step`
would otherwise silently train for the default number of steps.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

# Every key a config may hold, with its default. model.params is checked by PixelFlowModel's signature.
DEFAULTS = {
    "model": {"target": "pixelflow.model.PixelFlowModel", "params": {}},
    "scheduler": {"num_train_timesteps": 1000, "num_stages": 4, "pyramid_shift": False},
    "train": {
        "lr": 1e-4,
        "weight_decay": 0.0,
        "epochs": 10,
        "max_steps": None,          # stop after this many optimizer steps; wins over epochs
        "ema_decay": 0.9999,
        "grad_clip": 1.0,
        "label_dropout": 0.1,       # probability of the null label / empty caption
        "betas": [0.9, 0.999],
        "precision": "auto",        # auto: bf16 autocast on CUDA, fp32 on the CPU; or "bf16", "fp32"
        "keep_checkpoints": 3,      # newest checkpoints kept in OUTPUT/checkpoints
        "preview_steps": 0,         # also write a preview grid every N steps (0: only with each checkpoint)
        "attention": "auto",        # packed attention: auto (flash-attn's varlen kernel when usable), sdpa, flash_attn
    },
    "data": {
        "name": "imagefolder",      # imagefolder | synthetic | captions
        "root": None,
        "resolution": 256,
        "center_crop": True,
        "expand_ratio": 1.125,
        "batch_size": 32,           # per process
        "num_workers": 4,
        "captions_file": "captions.jsonl",  # data.name=captions: JSON lines {"file": ..., "caption": ...}
        "cache_text_features": False,      # data.name=captions: encode each caption once and keep it on disk
        "synthetic_size": 4096,            # data.name=synthetic: images per epoch
        "synthetic_classes": 4,
    },
    "text_encoder": {"name": "google/flan-t5-xl", "max_length": 512},
    "preview": {"num_inference_steps": 10, "guidance_scale": 2.0, "images_per_class": 4, "num_classes": 8,
                "prompts": []},
    "seed": 42,
}

# Sections a released config may omit or carry that we accept as is.
_FREE_FORM = {("model", "params")}


def default_config() -> DictConfig:
    return OmegaConf.create(DEFAULTS)


def _check_keys(user: DictConfig, schema: DictConfig, path: tuple[str, ...] = ()) -> None:
    for key in user.keys():
        where = ".".join(path + (str(key),))
        if key not in schema:
            valid = ", ".join(".".join(path + (str(k),)) for k in schema.keys())
            raise ValueError(f"unknown config key {where!r}; valid keys here: {valid}")
        value, spec = user[key], schema[key]
        if isinstance(spec, DictConfig) and (path + (str(key),)) not in _FREE_FORM:
            if value is None:  # `train:` with every entry commented out: an empty section, not "no defaults"
                user[key] = {}
                continue
            if not isinstance(value, DictConfig):
                raise ValueError(f"config key {where!r} must be a section, got {value!r}")
            _check_keys(value, spec, path + (str(key),))


# Sections of a pretrained folder's config.yaml that decide what its weights compute. A misspelled key in one of
# these (say scheduler.num_stage) would otherwise sample with the default silently.
_PRETRAINED_STRICT = ("model", "scheduler", "text_encoder")
_WARNED: set[tuple[str, tuple[str, ...]]] = set()


def check_pretrained_config(config: DictConfig, source: str) -> None:
    """Check a checkpoint's config.yaml: unknown keys in model, scheduler or text_encoder are errors; unknown
    keys elsewhere (the training settings the folder was made with) are named in a warning, since loading reads
    none of them but data.resolution (the default image size)."""
    import warnings

    if not isinstance(config, DictConfig):
        raise ValueError(f"{source} must hold a mapping, got {type(config).__name__}")
    schema = default_config()
    strict = OmegaConf.masked_copy(config, [k for k in _PRETRAINED_STRICT if k in config])
    try:
        _check_keys(strict, schema)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    unknown = []

    def collect(user, spec, path):
        for key in user.keys():
            where = path + (str(key),)
            if key not in spec:
                unknown.append(".".join(where))
            elif isinstance(spec[key], DictConfig) and isinstance(user[key], DictConfig) and where not in _FREE_FORM:
                collect(user[key], spec[key], where)

    rest = OmegaConf.masked_copy(config, [k for k in config.keys() if k not in _PRETRAINED_STRICT])
    collect(rest, schema, ())
    if unknown and (source, tuple(unknown)) not in _WARNED:  # once per file: a run reads its config several times
        _WARNED.add((source, tuple(unknown)))
        warnings.warn(f"{source}: config keys {unknown} are not known here and are ignored when loading", stacklevel=3)


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ValueError(f"overrides must look like key=value (e.g. train.max_steps=200), got {bad}")
    # OmegaConf reads `key=` as null, which would silently drop a setting such as the step cap.
    empty = [o for o in overrides if not o.split("=", 1)[1].strip()]
    if empty:
        raise ValueError(f"overrides {empty} have no value: give one, or write key=null to unset the entry")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- YAML file <- key=value overrides, each checked for unknown keys."""
    config = default_config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        user = OmegaConf.load(path)
        if not isinstance(user, DictConfig):
            raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(user).__name__}")
        _check_keys(user, config)
        config = OmegaConf.merge(config, user)
    if overrides:
        dot = parse_overrides(overrides)
        _check_keys(dot, config)
        config = OmegaConf.merge(config, dot)
    return config


def check_resolution(resolution: Any, patch_size: int, num_stages: int) -> None:
    """data.resolution must give every stage a whole number of patches: a positive multiple of
    patch_size * 2^(num_stages-1). Raises ValueError naming the values."""
    multiple = patch_size * 2 ** (num_stages - 1)
    if not _is_int(resolution) or resolution < multiple or resolution % multiple:
        raise ValueError(f"data.resolution={resolution} must be a positive multiple of {multiple} "
                         f"(model.params.patch_size {patch_size} x 2^(num_stages-1) with scheduler.num_stages "
                         f"{num_stages})")


def validate_train_config(config: DictConfig) -> None:
    """Check a training config before any work starts; errors name the key, the value and what is expected."""
    from .checkpoint import build_model

    scheduler = config.scheduler
    for key, low in (("num_stages", 1), ("num_train_timesteps", 2)):
        if not _is_int(scheduler[key]) or scheduler[key] < low:
            raise ValueError(f"scheduler.{key}={scheduler[key]!r} must be an int >= {low}")
    if scheduler.num_stages > scheduler.num_train_timesteps:  # else a stage gets no training time step
        raise ValueError(f"scheduler.num_stages={scheduler.num_stages} exceeds scheduler.num_train_timesteps="
                         f"{scheduler.num_train_timesteps}: every stage needs at least one training time step")
    if scheduler.pyramid_shift is not False:
        raise ValueError(f"scheduler.pyramid_shift={scheduler.pyramid_shift!r}: only false (the released method) "
                         "is supported")
    if not _is_int(config.seed) or config.seed < 0:
        raise ValueError(f"seed={config.seed!r} must be an int >= 0")
    model = build_model(config, meta=True)  # constructor checks model.params by name and value
    stages = int(scheduler.num_stages)
    data, train = config.data, config.train
    check_resolution(data.resolution, model.patch_size, stages)
    if not _is_int(data.batch_size) or data.batch_size < stages:
        raise ValueError(f"data.batch_size={data.batch_size} must be at least scheduler.num_stages={stages}: "
                         "every batch trains each stage")
    if data.name not in ("imagefolder", "synthetic", "captions"):
        raise ValueError(f"data.name={data.name!r}; expected imagefolder, synthetic or captions")
    for key in ("center_crop", "cache_text_features"):
        if not isinstance(data[key], bool):
            raise ValueError(f"data.{key}={data[key]!r} must be true or false")
    if not _is_number(data.expand_ratio) or data.expand_ratio <= 0:
        raise ValueError(f"data.expand_ratio={data.expand_ratio!r} must be a number > 0 (>= 1 with center_crop false)")
    for key in ("synthetic_size", "synthetic_classes"):
        if not _is_int(data[key]) or data[key] < 1:
            raise ValueError(f"data.{key}={data[key]!r} must be an int >= 1")
    if not isinstance(data.captions_file, str) or not data.captions_file:
        raise ValueError(f"data.captions_file={data.captions_file!r} must be a file name (JSON lines)")
    if data.name in ("imagefolder", "captions"):
        if not data.root:
            raise ValueError(f"data.root is not set; data.name={data.name} needs a folder of images "
                             "(or use data.name=synthetic for the built-in dataset)")
        if not Path(data.root).is_dir():
            raise ValueError(f"data.root={data.root!r} does not exist or is not a folder")
    if data.name == "captions" and model.cross_attention_dim is None:
        raise ValueError("data.name=captions trains text-to-image: model.params.cross_attention_dim must be set")
    if data.name == "captions" and model.num_classes:
        raise ValueError(f"data.name=captions gives captions, no class labels: model.params.num_classes must be 0, "
                         f"got {model.num_classes}")
    if data.name != "captions" and model.num_classes == 0:
        raise ValueError(f"data.name={data.name} gives class labels but model.params.num_classes is 0")
    if data.name != "captions" and model.cross_attention_dim is not None:
        raise ValueError(f"data.name={data.name} gives class labels, no captions, but model.params.cross_attention_dim="
                         f"{model.cross_attention_dim} makes a text-conditioned model; leave cross_attention_dim unset "
                         "(null) for class-to-image, or train it on data.name=captions")
    if data.name == "synthetic" and data.synthetic_classes > model.num_classes:
        raise ValueError(f"data.synthetic_classes={data.synthetic_classes} exceeds model.params.num_classes="
                         f"{model.num_classes}")
    if model.cross_attention_dim is not None:
        from .text import text_encoder_settings
        text_encoder_settings(config)  # checks text_encoder.name and max_length
    if train.max_steps is not None and (not _is_int(train.max_steps) or train.max_steps < 1):
        raise ValueError(f"train.max_steps={train.max_steps} must be a positive int or null")
    if not _is_int(train.epochs) or train.epochs < 1:
        raise ValueError(f"train.epochs={train.epochs} must be a positive int")
    if not _is_number(train.ema_decay) or not 0 <= train.ema_decay <= 1:
        raise ValueError(f"train.ema_decay={train.ema_decay!r} must be a number in [0, 1]")
    if not _is_number(train.label_dropout) or not 0 <= train.label_dropout < 1:
        raise ValueError(f"train.label_dropout={train.label_dropout!r} must be a number in [0, 1)")
    if train.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision={train.precision!r}; expected auto, bf16 or fp32")
    if not isinstance(train.keep_checkpoints, int) or train.keep_checkpoints < 1:
        raise ValueError(f"train.keep_checkpoints={train.keep_checkpoints} must be an int >= 1")
    if not isinstance(train.betas, (list, ListConfig)) or len(train.betas) != 2 \
            or not all(_is_number(b) and 0 <= b < 1 for b in train.betas):
        raise ValueError(f"train.betas={train.betas} must be two numbers in [0, 1)")
    for key, low in (("lr", 0.0), ("grad_clip", 0.0)):
        value = train[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
            raise ValueError(f"train.{key}={value!r} must be a number > {low:g}")
    if isinstance(train.weight_decay, bool) or not isinstance(train.weight_decay, (int, float)) \
            or train.weight_decay < 0:
        raise ValueError(f"train.weight_decay={train.weight_decay!r} must be a number >= 0")
    if not isinstance(train.preview_steps, int) or train.preview_steps < 0:
        raise ValueError(f"train.preview_steps={train.preview_steps!r} must be an int >= 0 (0: only with checkpoints)")
    from .model.attention import check_attention_backend
    try:
        check_attention_backend(train.attention)
    except ValueError as e:
        raise ValueError(f"train.attention={train.attention!r}: {e}") from None
    if not isinstance(data.num_workers, int) or data.num_workers < 0:
        raise ValueError(f"data.num_workers={data.num_workers!r} must be an int >= 0")
    _check_preview(config.preview)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_preview(preview: DictConfig) -> None:
    """The preview grid is drawn at every checkpoint: a bad value must stop the run now, not after 1000 steps."""
    for key in ("num_inference_steps", "images_per_class", "num_classes"):
        if not _is_int(preview[key]) or preview[key] < 1:
            raise ValueError(f"preview.{key}={preview[key]!r} must be an int >= 1")
    if not _is_number(preview.guidance_scale) or preview.guidance_scale < 0:
        raise ValueError(f"preview.guidance_scale={preview.guidance_scale!r} must be a number >= 0")
    prompts = preview.prompts
    if not isinstance(prompts, (list, ListConfig)) or not all(isinstance(q, str) for q in prompts):
        raise ValueError(f"preview.prompts={prompts!r} must be a list of strings, e.g. [\"a photo of a cat\"]")


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config, resolve=True)
