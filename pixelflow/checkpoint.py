"""Pretrained folders (config.yaml + model.pt) and atomic file writes.

This module holds the one function that loads a released (or our own) checkpoint's weights.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

WEIGHT_FILES = ("model.pt", "model.safetensors", "model.pth", "model.bin")
MODEL_FILE = WEIGHT_FILES[0]  # what our checkpoints write: the EMA weights as a flat state dict
DEFAULT_RESOLUTION = 256  # data.resolution when a config omits it (the released models)
_STRIP_PREFIXES = ("module.", "_orig_mod.")


_UMASK: int | None = None


def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask (read once: setting the umask to read it
    is not thread-safe, and the writers here may run in threads)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it onto `path`.

    A crash or kill at any point leaves either the old file or the new one, never a torn one. The file gets
    the mode a plain open() would give it (mkstemp's own is 0600: readable by its owner only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with contextlib.suppress(OSError):  # filesystems without modes (vfat, some object stores) refuse it
            os.chmod(tmp, _file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class FolderError(ValueError):
    """An output folder that cannot be made or written: reported by its option, without a traceback."""


def check_writable_folder(folder: str | os.PathLike, flag: str) -> Path | None:
    """Refuse a folder that cannot be made: its nearest existing ancestor must be a writable folder. (An
    existing folder is left to the run: a finished one needs no writes inside it.) flag: the option that named
    it, for the message. Returns the outermost folder that making it would create (None: it exists)."""
    folder = Path(folder)
    if folder.is_dir():
        return None
    if folder.exists():
        raise FolderError(f"{flag} {str(folder)!r} exists and is not a folder")
    existing, outermost = Path(os.path.abspath(folder)), None
    while not existing.exists():
        existing, outermost = existing.parent, existing
    if not existing.is_dir():
        raise FolderError(f"{flag} {str(folder)!r} cannot be made: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FolderError(f"{flag} {str(folder)!r}: {str(existing)!r} is not writable by this user")
    return outermost


def make_folder(folder: str | os.PathLike, flag: str) -> None:
    """mkdir -p, with an OSError (a read-only file system, which os.access does not see for root) said as a
    FolderError naming the option."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FolderError(f"{flag} {str(folder)!r} cannot be made: {e.strerror or e}") from None


def instantiate(target: str, params: dict) -> torch.nn.Module:
    """Build `target(**params)`; target is a dotted path inside the pixelflow package."""
    if not isinstance(target, str) or not target.startswith("pixelflow."):
        raise ValueError(f"model.target must name a class in the pixelflow package, got {target!r}")
    module_name, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.target {target!r} does not resolve: {e}") from None
    import inspect
    accepted = [n for n, p in inspect.signature(cls).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown model.params key(s) {unknown} for {target}; valid keys: {accepted}")
    return cls(**params)


def build_model(config: DictConfig, device: torch.device | str = "cpu", meta: bool = False) -> torch.nn.Module:
    """Instantiate config.model (target + params) without loading weights."""
    if "model" not in config or "params" not in config.model:
        raise ValueError("config has no model.params section")
    params = OmegaConf.to_container(config.model.params, resolve=True)
    target = config.model.get("target", "pixelflow.model.PixelFlowModel")
    with torch.device("meta" if meta else device):
        return instantiate(target, params)


@dataclass(frozen=True)
class ConfigSummary:
    """What the scripts need to know of a checkpoint's config before loading weights (released defaults)."""

    num_classes: int
    num_stages: int
    num_train_timesteps: int
    pyramid_shift: bool
    resolution: int


def summarize_config(config: DictConfig) -> ConfigSummary:
    params = config.get("model", {}).get("params", {})
    scheduler = config.get("scheduler", {})
    return ConfigSummary(
        num_classes=_config_int(params.get("num_classes", 0) or 0, "model.params.num_classes"),
        num_stages=_config_int(scheduler.get("num_stages", 4), "scheduler.num_stages"),
        num_train_timesteps=_config_int(scheduler.get("num_train_timesteps", 1000), "scheduler.num_train_timesteps"),
        pyramid_shift=bool(scheduler.get("pyramid_shift", False)),
        resolution=_config_int(config.get("data", {}).get("resolution", DEFAULT_RESOLUTION), "data.resolution"),
    )


def _config_int(value: Any, key: str) -> int:
    # int() would pass 256.7 as 256 and say nothing of the key for "abc"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}={value!r} in the config must be an int")
    return value


def check_sampling_resolution(config: DictConfig, source: str) -> int:
    """data.resolution of a checkpoint's config, the size the scripts sample at, checked before any weights load
    (config.check_resolution); source names the file in the error."""
    from .config import check_resolution

    try:
        summary = summarize_config(config)
        check_resolution(summary.resolution, build_model(config, meta=True).patch_size, summary.num_stages)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return summary.resolution


def scheduler_from_config(config: DictConfig):
    """The PixelFlowScheduler a config describes."""
    from .scheduler import PixelFlowScheduler
    summary = summarize_config(config)
    return PixelFlowScheduler(num_train_timesteps=summary.num_train_timesteps, num_stages=summary.num_stages,
                              pyramid_shift=summary.pyramid_shift)


def find_weights(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"checkpoint folder {str(folder)!r} has no weights: expected one of {WEIGHT_FILES}")


class WeightsError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file: a flat state dict, or one wrapped as {"ema": ...} (preferred) or {"model": ...}."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # missing, unreadable, a folder: the system's own message says it
        raise
    except Exception as e:  # a truncated or foreign file: name it, whatever the reader's own words are
        raise WeightsError(f"could not read the weights file {str(path)!r} ({path.stat().st_size} bytes): "
                         f"{type(e).__name__}: {str(e)[:600]}\nis it a complete PyTorch (.pt) or safetensors "
                         "file? A copy interrupted midway reads like this.") from e
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, expected a state dict")
    for wrapper in ("ema", "model", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
            break
    out = {}
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                 model_from: str = "its config") -> None:
    """Strict load that names every missing and unexpected key and every shape mismatch. model_from says
    which config built `model`, for the message."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"weights in {source} do not match the model built from {model_from}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {shapes[:10]}")
        raise WeightsError("\n".join(lines))
    expected_dtype = {k: v.dtype for k, v in expected.items()}
    state = {k: v.to(expected_dtype[k]) for k, v in state.items()}
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)


def load_config(folder: str | os.PathLike) -> DictConfig:
    """A pretrained folder's config.yaml, its keys checked (config.check_pretrained_config)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist or is not a folder")
    path = folder / "config.yaml"
    if not path.is_file():
        raise ValueError(f"checkpoint folder {str(folder)!r} has no config.yaml")
    from .config import check_pretrained_config
    config = OmegaConf.load(path)
    check_pretrained_config(config, str(path))
    return config


CHECKPOINTS_DIR = "checkpoints"


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """OUTPUT/checkpoints/<step, 7 digits>: one training checkpoint, itself a pretrained folder."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"{step:07d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete training checkpoints under OUTPUT/checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "config.yaml").is_file()
             and any((p / w).is_file() for w in WEIGHT_FILES)]
    return sorted(found, key=lambda p: int(p.name))


def resolve_pretrained(path: str | os.PathLike) -> Path:
    """A pretrained folder (config.yaml + weights) as given, or the newest checkpoint of a training run's
    output folder (OUTPUT/checkpoints/<step>/)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint folder {str(path)!r} does not exist")
    if (path / "config.yaml").is_file():
        return path
    runs = list_checkpoints(path)
    if runs:
        return runs[-1]
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is not a folder; expected a folder with config.yaml and model.pt")
    raise ValueError(f"checkpoint folder {str(path)!r} has no config.yaml (and no checkpoints/<step>/ inside)")


def load_pretrained(folder: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, DictConfig]:
    """Load a pretrained folder (config.yaml + model.pt/.safetensors) -> (model in eval mode, config).

    A training run's output folder loads its newest checkpoint.
    """
    folder = resolve_pretrained(folder)
    config = load_config(folder)
    weights = find_weights(folder)
    model = build_model(config, meta=True)  # no init work: every tensor comes from the file
    load_weights(model, read_state_dict(weights), source=str(weights))
    return model.to(device).eval(), config
