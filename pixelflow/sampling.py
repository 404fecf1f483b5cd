"""Sample many images to a folder of PNGs and one `.npz` for FID (what `sample_ddp.py` runs).

Layout and seeds. Image i gets class label `i mod num_classes` (50 per class for 50,000 samples over 1,000
classes), or prompt `i mod len(prompts)` for text-to-image, and its own torch.Generator on the sampling device,
seeded from (global seed, i). The indices are cut into chunks of `local_batch_size` consecutive indices, one
chunk per batch, and chunk c goes to rank `c mod world_size`; so a batch holds the same images whatever the
number of processes, and the .npz does not depend on it.
- Euler: an image depends only on its index and the settings. On the CPU the tests find it byte-exact for any
  batch size; on CUDA the kernels vary with the batch shape, so another --local-batch-size can move a few pixels
  by a level of 8-bit rounding (bf16 more than fp32).
- dopri5: the adaptive step size is shared by a batch, so an image also depends on which images share its
  batch: the same for any number of processes, but --local-batch-size is part of the settings.
A resumed run re-samples any chunk with a missing image whole (writing only the missing ones), so re-running
the same command gives exactly what an uninterrupted run gives.

Files. `D/NNNNNN.png` (global index, 6 digits), each written atomically; `D/sampling_args.json` with the
settings that decide the pixels; then `D.npz` (key arr_0, uint8 (N, H, W, 3), index order), written by rank 0
once every image exists. Re-running the same command resumes: readable PNGs of the right size are kept,
missing or broken ones are made; a folder made with other settings is refused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoint import (CHECKPOINTS_DIR, FolderError, WeightsError, atomic_write, check_sampling_resolution,
                         check_writable_folder, find_weights, load_config, make_folder, resolve_pretrained,
                         summarize_config)
from .distributed import (DistributedContext, agree, all_gather, all_reduce_sum, barrier, cleanup, init_distributed,
                          resolve_device)
from .pipeline import GUIDANCE_SCHEDULES, steps_per_stage

SETTINGS_FILE = "sampling_args.json"
SETTINGS_FORMAT = 1
DOPRI5_BATCHES = "full [c*B, (c+1)*B); doubled state whenever cfg > 0"

# How a per-image seed is derived; part of the settings so a change of scheme can never mix images.
SEED_SCHEME = "numpy.SeedSequence([global_seed, index]) -> uint64"
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}
# Processes that finish their share wait at a barrier for the slowest one before rank 0 writes the .npz;
# after a resume the shares can be uneven, so the wait may be long.
BARRIER_TIMEOUT = datetime.timedelta(hours=6)
_STALE_TMP = re.compile(r"^\.(\d{6,}\.png|" + re.escape(SETTINGS_FILE) + r")\..*\.tmp$")


@dataclass
class SampleOptions:
    """The command line of sample_ddp.py (names as its flags). None means "the default for this setup"."""

    pretrained: str
    sample_dir: str | None = None
    cfg: float = 2.4
    num_steps_per_stage: Sequence[int] = (30,)
    use_ode_dopri5: bool = False
    local_batch_size: int = 16
    num_fid_samples: int = 50_000
    num_classes: int | None = None
    global_seed: int = 10
    shift: float = 1.0
    precision: str | None = None
    device: str | None = None
    prompts: str | None = None
    progress: bool = True
    fast: bool = True
    guidance_schedule: str = "ramp"


@dataclass
class SamplingPlan:
    """Everything checked and resolved before any process group, model or image exists."""

    options: SampleOptions
    checkpoint: Path                 # the resolved pretrained folder
    sample_dir: Path
    device: torch.device
    precision: str
    steps: list[int]                 # Euler steps per stage
    solver: str
    resolution: int
    num_classes: int                 # 0 for text-to-image
    prompts: list[str] | None
    settings: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- layout
def image_label(index: int, num_classes: int) -> int:
    """The class of image `index`: index mod num_classes (equal counts when num_classes divides N)."""
    return index % num_classes


def class_labels(indices: Sequence[int], num_classes: int) -> list[int]:
    return [image_label(i, num_classes) for i in indices]


def image_prompts(indices: Sequence[int], prompts: Sequence[str]) -> list[str]:
    """The prompt of image i is prompts[i mod len(prompts)]."""
    return [prompts[i % len(prompts)] for i in indices]


def chunks_for_rank(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """The index chunks of one process: chunk c = [c*B, (c+1)*B) (the last one may be shorter), for c = rank,
    rank + W, ... Every index in [0, num_samples) belongs to exactly one chunk of exactly one rank."""
    num_chunks = math.ceil(num_samples / batch_size)
    return [range(c * batch_size, min((c + 1) * batch_size, num_samples))
            for c in range(rank, num_chunks, world_size)]


def pending_batches(chunks: Sequence[range], is_done: Callable[[int], bool],
                    batch_size: int) -> list[tuple[list[int], list[int]]]:
    """The batches still to sample, as (indices to sample, indices to write).

    A chunk with any missing image is sampled whole, and always as a full batch of batch_size indices
    [c*B, (c+1)*B), the last chunk too (its images past N are made and dropped): every image is then made in
    the same batch whatever N is and however often the run was interrupted (dopri5 couples a batch; GPU
    kernels vary with the batch shape). Only the missing images are written. A killed run leaves at most one
    partial chunk per process.
    """
    work = []
    for chunk in chunks:
        missing = [i for i in chunk if not is_done(i)]
        if missing:
            work.append((list(range(chunk.start, chunk.start + batch_size)), missing))
    return work


def image_seed(global_seed: int, index: int) -> int:
    """A 64-bit seed for image `index`, mixed from (global_seed, index) so that nearby seeds and indices give
    unrelated streams."""
    return int(np.random.SeedSequence([global_seed, index]).generate_state(1, dtype=np.uint64)[0])


def image_generators(global_seed: int, indices: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One torch.Generator per image on the sampling device: image i's noise depends on (global_seed, i) only."""
    return [torch.Generator(device=device).manual_seed(image_seed(global_seed, i)) for i in indices]


# ---------------------------------------------------------------------------------------------- files
def png_path(sample_dir: str | os.PathLike, index: int) -> Path:
    return Path(sample_dir) / f"{index:06d}.png"


def npz_path(sample_dir: str | os.PathLike) -> Path:
    """D.npz beside the folder D (the name may hold dots, e.g. cfg2.4, so no with_suffix). A folder named
    "." or ".." is made absolute first, so `--sample-dir .` gives ../<this folder>.npz, not ./.npz."""
    sample_dir = Path(sample_dir)
    if sample_dir.name in ("", ".", ".."):
        sample_dir = Path(os.path.abspath(sample_dir))
    if not sample_dir.name:
        raise ValueError(f"sample folder {str(sample_dir)!r} has no name to call its .npz by; pick a subfolder")
    return sample_dir.parent / f"{sample_dir.name}.npz"


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """pixels: (H, W, 3) uint8. Written to a temporary name and renamed, so a kill never leaves half a file."""
    from PIL import Image
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    image = Image.fromarray(np.ascontiguousarray(pixels))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def read_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8."""
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def is_complete_png(path: str | os.PathLike, height: int, width: int) -> bool:
    """True when `path` decodes fully as an RGB image of height x width."""
    from PIL import Image
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.mode != "RGB" or image.size != (width, height):
                return False
            image.load()
        return True
    except Exception:  # truncated or corrupt: PIL raises several kinds of error
        return False


def write_npz(sample_dir: str | os.PathLike, num_samples: int, height: int, width: int,
              progress: bool = False) -> Path:
    """Stack D/000000.png ... D/<N-1>.png in index order into D.npz (arr_0: uint8 (N, H, W, 3)), atomically."""
    sample_dir = Path(sample_dir)
    missing = [i for i in range(num_samples) if not png_path(sample_dir, i).is_file()]
    if missing:
        raise RuntimeError(f"cannot build the .npz: {len(missing)} of {num_samples} images are missing in "
                           f"{sample_dir} (first: {png_path(sample_dir, missing[0]).name}); with several nodes "
                           f"the sample folder must be on a shared file system")
    samples = np.empty((num_samples, height, width, 3), dtype=np.uint8)
    for i in _bar(range(num_samples), progress, desc="building .npz", unit="img"):
        pixels = read_png(png_path(sample_dir, i))
        if pixels.shape != (height, width, 3):
            raise RuntimeError(f"{png_path(sample_dir, i)} is {pixels.shape}, expected {(height, width, 3)}")
        samples[i] = pixels
    out = npz_path(sample_dir)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, arr_0=samples)

    atomic_write(out, save)
    return out


def remove_stale_temporaries(sample_dir: Path) -> int:
    """Delete temporary files that a killed run left behind (atomic_write's .NAME.XXXX.tmp)."""
    removed = 0
    candidates = list(sample_dir.iterdir()) if sample_dir.is_dir() else []
    npz = npz_path(sample_dir)
    npz_tmp = re.compile(r"^\." + re.escape(npz.name) + r"\..*\.tmp$")
    if npz.parent.is_dir():
        candidates += [p for p in npz.parent.iterdir() if npz_tmp.match(p.name)]
    for path in candidates:
        if (_STALE_TMP.match(path.name) or npz_tmp.match(path.name)) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def load_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (UTF-8, a BOM allowed; only newlines end a line); blank lines are skipped, so
    prompt i is the file's i-th non-blank line."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--prompts {str(path)!r} is a folder; expected a text file with one prompt per line")
    if not path.is_file():
        raise ValueError(f"--prompts file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts file {str(path)!r} is not UTF-8 text ({e})") from None
    prompts = [line.strip() for line in text.split("\n")]  # not splitlines: U+2028 inside a prompt stays
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--prompts file {str(path)!r} holds no prompts (expected one prompt per line)")
    return prompts


# ---------------------------------------------------------------------------------------------- settings
def sampling_settings(plan: SamplingPlan) -> dict:
    """The settings that decide the pixels of image i. Two runs with equal settings make equal images, so a
    folder may only be resumed with the same ones. The batch size counts only for dopri5: with Euler it changes
    at most the rounding of a few pixels on CUDA (see the module docstring)."""
    weights = find_weights(plan.checkpoint)
    opts = plan.options
    settings = {
        "format": SETTINGS_FORMAT,
        "config": config_fingerprint(load_config(plan.checkpoint)),
        "weights": weights_fingerprint(weights),
        "resolution": plan.resolution,
        "solver": plan.solver,
        "num_steps_per_stage": plan.steps if plan.solver == "euler" else None,
        "local_batch_size": opts.local_batch_size if plan.solver == "dopri5" else None,
        # How a dopri5 batch is formed (its images share one adaptive step size); earlier folders cut the last
        # batch at N and kept no doubled state for --guidance-schedule constant --cfg 1, so they are refused.
        "dopri5_batches": DOPRI5_BATCHES if plan.solver == "dopri5" else None,
        "cfg": float(opts.cfg),
        "guidance_schedule": opts.guidance_schedule,
        "shift": float(opts.shift),
        "global_seed": int(opts.global_seed),
        "seed_scheme": SEED_SCHEME,
        "num_classes": plan.num_classes,
        "prompts": None,
        "precision": plan.precision,
        "device_type": plan.device.type,  # CPU and CUDA generators draw different noise from one seed
        "fast_path": bool(opts.fast) and plan.device.type == "cuda",  # changes bf16 rounding on CUDA only
    }
    if plan.prompts is not None:
        digest = hashlib.sha256("\n".join(plan.prompts).encode("utf-8")).hexdigest()
        settings["prompts"] = {"count": len(plan.prompts), "sha256": digest}
    return settings


FINGERPRINT_BYTES = 4 << 20
# The config sections that decide the pixels (the rest: training and data settings, preview prompts).
CONFIG_SECTIONS = ("model", "scheduler", "text_encoder")


def config_fingerprint(config) -> dict:
    """A sha256 of the config sections that decide the pixels, and the resolution; not the folder's path, so
    a checkpoint copied elsewhere (a job's scratch folder) still resumes its sample folder."""
    from omegaconf import OmegaConf
    container = OmegaConf.to_container(config, resolve=True)
    decisive = {k: container.get(k) for k in CONFIG_SECTIONS}
    decisive["resolution"] = summarize_config(config).resolution
    text = json.dumps(decisive, sort_keys=True, default=str)
    return {"sections": list(CONFIG_SECTIONS) + ["resolution"],
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def weights_fingerprint(path: Path) -> dict:
    """Which weights made a folder's images, without reading gigabytes: the file's name and size and a sha256
    of its first and last 4 MiB. The head holds a safetensors header or the first tensors; the tail of a
    PyTorch file is its zip directory, which carries a CRC-32 of every tensor. A copy or `touch` keeps it."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read())
    return {"file": path.name, "bytes": size, "sha256_head_tail": digest.hexdigest()}


def read_settings(sample_dir: Path) -> dict | None:
    path = sample_dir / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it together with the folder's images") from None


def check_resumable(sample_dir: Path, settings: dict) -> None:
    """Refuse to add images to a folder made with other settings (or by something else)."""
    saved = read_settings(sample_dir)
    if saved is None:
        if sample_dir.is_dir() and any(p.suffix == ".png" for p in sample_dir.iterdir()):
            raise ValueError(f"sample folder {str(sample_dir)!r} already holds PNGs but no {SETTINGS_FILE}, so "
                             f"they may come from other settings; pick another --sample-dir or empty it")
        return
    recorded = dict(saved.get("settings", saved))
    if "checkpoint" in recorded and "config" not in recorded:
        # Written when a folder recorded its checkpoint's path instead of its config: the config found there
        # must match this run's; if that folder is gone (moved), the weights fingerprint decides alone.
        old_folder = Path(str(recorded.pop("checkpoint")))
        recorded["config"] = settings.get("config")
        if (old_folder / "config.yaml").is_file():
            try:
                recorded["config"] = config_fingerprint(load_config(old_folder))
            except Exception:  # noqa: BLE001 - unreadable now: it cannot vouch for either side
                pass
    old_weights, weights = recorded.get("weights"), settings.get("weights")
    if isinstance(old_weights, dict) and "mtime_ns" in old_weights and isinstance(weights, dict):
        # Written before the content fingerprint (file, bytes, mtime): the same file name and size pass.
        if (old_weights.get("file"), old_weights.get("bytes")) == (weights.get("file"), weights.get("bytes")):
            recorded["weights"] = weights
    differ = sorted(k for k in set(settings) | set(recorded) if settings.get(k) != recorded.get(k))
    if differ:
        lines = [f"  {k}: folder has {recorded.get(k)!r}, this run has {settings.get(k)!r}" for k in differ]
        raise ValueError(f"sample folder {str(sample_dir)!r} was made with other settings, and resuming would "
                         f"mix images:\n" + "\n".join(lines) +
                         "\nuse another --sample-dir (or delete the folder) to start over")


def write_settings(plan: SamplingPlan, world_size: int) -> None:
    """D/sampling_args.json: the settings that decide the pixels, plus how this run was launched (not compared)."""
    path = plan.sample_dir / SETTINGS_FILE
    if path.is_file():
        return
    opts = plan.options
    record = {"settings": plan.settings,
              "run": {"pretrained": opts.pretrained, "num_fid_samples": opts.num_fid_samples,
                      "local_batch_size": opts.local_batch_size, "world_size": world_size,
                      "prompts_file": opts.prompts, "torch": torch.__version__}}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))


def default_sample_dir(checkpoint: Path, cfg: float, solver: str, steps: Sequence[int], seed: int,
                       shift: float = 1.0, prompts: str | None = None, guidance_schedule: str = "ramp") -> Path:
    """samples/<checkpoint name>-cfg<cfg>-steps<n or n_n_n_n | dopri5>[-shift<s>][-<prompts file>]-seed<seed>.

    A training checkpoint OUT/checkpoints/0001000 is named <OUT name>-0001000."""
    checkpoint = checkpoint.resolve()
    name = checkpoint.name
    if checkpoint.parent.name == CHECKPOINTS_DIR:
        name = f"{checkpoint.parent.parent.name}-{name}"
    if solver == "dopri5":
        method = "dopri5"
    else:
        method = "steps" + (str(steps[0]) if len(set(steps)) == 1 else "_".join(str(s) for s in steps))
    parts = [name, f"cfg{cfg:g}" + ("const" if guidance_schedule == "constant" else ""), method]
    if shift != 1.0:
        parts.append(f"shift{shift:g}")
    if prompts is not None:
        parts.append(Path(prompts).stem)
    parts.append(f"seed{seed}")
    return Path("samples") / "-".join(parts)


# ---------------------------------------------------------------------------------------------- plan
def check_options(opts: SampleOptions) -> None:
    """Value checks that need no files."""
    if opts.num_fid_samples < 1:
        raise ValueError(f"--num-fid-samples must be >= 1, got {opts.num_fid_samples}")
    if opts.local_batch_size < 1:
        raise ValueError(f"--local-batch-size must be >= 1, got {opts.local_batch_size}")
    steps = list(opts.num_steps_per_stage)
    if not steps or min(steps) < 1:
        raise ValueError(f"--num-steps-per-stage must be >= 1 (one int, or one per stage), got {steps}")
    if not (opts.cfg >= 0 and math.isfinite(opts.cfg)):
        raise ValueError(f"--cfg must be a finite number >= 0 (0 = no guidance), got {opts.cfg}")
    if opts.guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"--guidance-schedule must be one of {GUIDANCE_SCHEDULES}, got {opts.guidance_schedule!r}")
    if not (opts.shift > 0 and math.isfinite(opts.shift)):
        raise ValueError(f"--shift must be > 0, got {opts.shift}")
    if opts.global_seed < 0:
        raise ValueError(f"--global-seed must be >= 0, got {opts.global_seed}")
    if opts.precision is not None and opts.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}, got {opts.precision!r}")
    if opts.num_classes is not None and opts.num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {opts.num_classes}")


def plan_sampling(opts: SampleOptions) -> SamplingPlan:
    """Check every option against the checkpoint's config and the sample folder; load no weights.

    Raises ValueError naming the bad value. sample_ddp.py runs it in every process through plan_on_every_rank,
    so a bad command stops all of them at once instead of leaving some waiting at a barrier.
    """
    check_options(opts)
    checkpoint = resolve_pretrained(opts.pretrained)
    config = load_config(checkpoint)
    find_weights(checkpoint)
    resolution = check_sampling_resolution(config, str(checkpoint / "config.yaml"))
    summary = summarize_config(config)
    model_classes, num_stages = summary.num_classes, summary.num_stages

    steps = steps_per_stage(opts.num_steps_per_stage, num_stages, "--num-steps-per-stage")

    prompts = None
    if model_classes > 0:
        if opts.prompts is not None:
            raise ValueError(f"--prompts was given but {str(checkpoint)!r} is a class-to-image checkpoint "
                             f"({model_classes} classes); drop --prompts")
        if opts.num_classes is not None and opts.num_classes != model_classes:
            raise ValueError(f"--num-classes {opts.num_classes} disagrees with the checkpoint, whose model has "
                             f"num_classes={model_classes}; pass --num-classes {model_classes} or leave it out")
    else:
        if opts.prompts is None:
            raise ValueError(f"{str(checkpoint)!r} is a text-to-image checkpoint: pass --prompts FILE "
                             f"(one prompt per line; image i uses prompt i mod the number of prompts)")
        if opts.num_classes is not None:
            raise ValueError(f"--num-classes {opts.num_classes} was given but {str(checkpoint)!r} is a "
                             f"text-to-image checkpoint (num_classes=0); drop --num-classes")
        prompts = load_prompts(opts.prompts)

    device = resolve_device(opts.device)
    precision = opts.precision or ("bf16" if device.type == "cuda" else "fp32")
    solver = "dopri5" if opts.use_ode_dopri5 else "euler"
    if opts.sample_dir is not None:
        sample_dir = Path(opts.sample_dir)
    else:
        sample_dir = default_sample_dir(checkpoint, opts.cfg, solver, steps, opts.global_seed, opts.shift,
                                        opts.prompts, opts.guidance_schedule)
    check_writable_folder(sample_dir, "--sample-dir")
    npz_path(sample_dir)
    plan = SamplingPlan(options=opts, checkpoint=checkpoint, sample_dir=sample_dir, device=device,
                        precision=precision, steps=steps, solver=solver, resolution=resolution,
                        num_classes=model_classes, prompts=prompts)
    plan.settings = sampling_settings(plan)
    check_resumable(sample_dir, plan.settings)
    return plan


def plan_on_every_rank(opts: SampleOptions, ctx: DistributedContext) -> SamplingPlan:
    """plan_sampling in a joined process group: one process's bad option (say a checkpoint folder that one
    node lacks) stops every process at once, on every node."""
    plan, error = None, None
    try:
        plan = plan_sampling(opts)
    except Exception as e:  # noqa: BLE001 - re-raised in this process by agree, reported to the others
        error = e
    agree(ctx, error, "checking the options")
    if ctx.world_size > 1:
        # Every process must sample with the same settings, weights included: nodes with their own copy of a
        # checkpoint could hold different files under one path, and would mix images silently.
        text = json.dumps(plan.settings, sort_keys=True, default=str)
        digests = all_gather(ctx, hashlib.sha256(text.encode("utf-8")).hexdigest())
        if len(set(digests)) > 1:  # every process sees the same list, so all of them stop here
            raise ValueError(f"the processes of this job disagree on the sampling settings (a checkpoint that "
                             f"differs between nodes?); this process (rank {ctx.rank}) has weights "
                             f"{plan.settings['weights']} and config {plan.settings['config']['sha256'][:12]}")
    return plan


# ---------------------------------------------------------------------------------------------- run
def sample_to_folder(plan: SamplingPlan, ctx: DistributedContext | None = None) -> Path:
    """Sample this rank's missing images and (rank 0) write D.npz; returns its path. Without `ctx` this joins
    the process group itself (and leaves it at the end)."""
    if ctx is not None:
        return _sample(plan, ctx)
    ctx = init_distributed(plan.device, timeout=BARRIER_TIMEOUT)
    try:
        return _sample(plan, ctx)
    finally:
        cleanup()


def _sample(plan: SamplingPlan, ctx: DistributedContext) -> Path:
    from .pipeline import PixelFlowPipeline

    opts = plan.options
    # The weights load before the folder records its settings: a run that cannot load them leaves nothing
    # behind that a corrected rerun would have to match.
    pipe, error = None, None
    try:
        pipe = PixelFlowPipeline.from_pretrained(plan.checkpoint, device=ctx.device,
                                                 autocast_dtype=PRECISIONS[plan.precision])
    except (ValueError, OSError) as e:   # WeightsError is a ValueError
        error = e
    agree(ctx, error, "loading the weights", WeightsError)
    if opts.fast:  # merged, compiled, graph-captured forwards on CUDA; the plain model elsewhere
        from .fast import accelerate
        accelerate(pipe, precision="keep")
    error = None
    if ctx.is_main:
        try:
            make_folder(plan.sample_dir, "--sample-dir")
            write_settings(plan, ctx.world_size)
            remove_stale_temporaries(plan.sample_dir)
        except (ValueError, OSError) as e:
            error = e if isinstance(e, FolderError) else FolderError(f"--sample-dir {str(plan.sample_dir)!r}: {e}")
    agree(ctx, error, "preparing the sample folder", FolderError)
    size = plan.resolution
    chunks = chunks_for_rank(opts.num_fid_samples, opts.local_batch_size, ctx.rank, ctx.world_size)
    work = pending_batches(chunks, lambda i: is_complete_png(png_path(plan.sample_dir, i), size, size),
                           opts.local_batch_size)
    todo_here = sum(len(m) for _, m in work)
    todo_all = all_reduce_sum(ctx, todo_here)
    done_all = opts.num_fid_samples - todo_all
    stale = npz_path(plan.sample_dir)
    if ctx.is_main and todo_all and stale.exists():
        # An .npz of an earlier, smaller N: gone until this run writes the full one, so a run killed on the
        # way never leaves a plausible but short .npz behind.
        stale.unlink()
    if ctx.is_main:
        print(f"sampling {opts.num_fid_samples} images ({done_all} already in {plan.sample_dir}) with "
              f"{ctx.world_size} process(es) on {ctx.device.type}, {plan.solver}, {plan.precision}", flush=True)

    bar = _bar(None, opts.progress and ctx.is_main, total=opts.num_fid_samples, initial=done_all,
               desc="sampling", unit="img")
    made_here, error = 0, None
    for indices, to_write in work:
        try:
            images = pipe(**_conditions(plan, indices), height=size, width=size,
                          num_inference_steps=plan.steps, guidance_scale=opts.cfg, shift=opts.shift,
                          guidance_schedule=opts.guidance_schedule,
                          solver=plan.solver, generator=image_generators(opts.global_seed, indices, ctx.device),
                          output_type="uint8")
        except FloatingPointError as e:  # said by every process below, not left to a dead peer at the barrier
            error = e
            break
        keep = set(to_write)
        for index, pixels in zip(indices, images):
            if index in keep:
                write_png(png_path(plan.sample_dir, index), pixels)
        made_here += len(to_write)
        if bar is not None:
            # rank 0 sees only its own share; the others' progress is estimated as the same fraction
            position = done_all + round(todo_all * made_here / todo_here)
            bar.update(max(0, position - bar.n))
    agree(ctx, error, "sampling", FloatingPointError)
    barrier(ctx)
    if bar is not None:
        bar.update(opts.num_fid_samples - bar.n)
        bar.close()

    out = npz_path(plan.sample_dir)
    if ctx.is_main:
        out = write_npz(plan.sample_dir, opts.num_fid_samples, size, size, progress=opts.progress)
        print(f"wrote {out} with {opts.num_fid_samples} images of {size}x{size}", flush=True)
    return out


def _conditions(plan: SamplingPlan, indices: Sequence[int]) -> dict:
    if plan.prompts is not None:
        return {"prompt": image_prompts(indices, plan.prompts)}
    return {"class_labels": class_labels(indices, plan.num_classes)}


def _bar(iterable, enabled: bool, **kwargs):
    """A tqdm bar on stderr (images done, images/s, time left), or the plain iterable / None when disabled."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)
