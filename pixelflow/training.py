"""The training loop: packed multi-resolution batches, AdamW, EMA, atomic checkpoints and exact resume.

Every random draw of a step (stage assignment, model times, noise, label dropout) comes from generators
seeded by (seed, rank, step), and the data order and augmentation from (seed, epoch, index). A resumed
run therefore replays exactly the steps the interrupted one would have taken.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import distributed
from .batching import assign_stages, pack_batch, per_image_mse
from .checkpoint import (CHECKPOINTS_DIR, MODEL_FILE, atomic_save, atomic_write, build_model, check_writable_folder,
                         checkpoint_dir, list_checkpoints, load_config, load_weights, make_folder, read_state_dict,
                         resolve_pretrained, scheduler_from_config)
from .config import to_yaml, validate_train_config
from .data import DATA_ORDER, ResumableShardSampler, build_dataset, derive_seed, gather_examples, image_grid
from .model import set_attention_backend

log = logging.getLogger("pixelflow.train")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a divergence, a signal, a checkpoint that could not be written); its message
    says why and what to do. train.py prints it without a traceback; exit_code is the process's."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

TRAINING_STATE = "training_state.pt"
KILL_HOOK = "PIXELFLOW_TEST_KILL_IN_CHECKPOINT"  # tests: SIGKILL this process half-way through writing step N
# How long a collective waits for the slowest process: at a checkpoint the others wait while rank 0 writes
# the weights, the optimizer state and the EMA (11 GB for XL) and renders a preview, which on network storage
# can pass NCCL's default of 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)


@dataclass
class TrainOptions:
    output_dir: str = "./exp0001"
    resume: bool = False
    logging_steps: int = 10
    checkpoint_steps: int = 1000
    pretrained_model: str | None = None
    report_to: str | None = None
    progress: bool = True


@dataclass
class Progress:
    step: int = 0          # optimizer steps done
    epoch: int = 0
    position: int = 0      # batches done in the current epoch
    skipped_images: int = 0
    # The log window open at a checkpoint (loss summed over its steps, the mean over processes): a resumed
    # run's first log row then averages the same steps as the uninterrupted run's.
    window_loss: float = 0.0
    window_steps: int = 0


# ---------------------------------------------------------------------------- small pieces
def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one process's random draws at one step (stages, model times, noise, label dropout)."""
    return derive_seed(seed, rank, step)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters (decay 0 copies, 1 freezes)."""
    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"train.precision={precision} needs CUDA; this run is on {device}")
    return torch.bfloat16


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def setup_logging(output_dir: Path, is_main: bool) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if not is_main:
        return
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(lambda record: not getattr(record, "file_only", False))  # e.g. loss rows under a progress bar
    for handler in (logging.FileHandler(output_dir / "log.txt"), console):
        handler.setFormatter(fmt)
        log.addHandler(handler)


class StopSignals:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) ask the run to save a checkpoint at the end of the
    current step and stop. A second Ctrl-C acts as usual (stops at once); a second SIGTERM is ignored, since a
    scheduler and torchrun both send one (and escalate to SIGKILL after their grace period anyway). Handlers
    are installed only in the main thread, and restored on exit; DataLoader workers ignore both signals."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received:
            return  # a repeated SIGTERM (SIGINT's handler is the usual one again by now)
        self.received = signum
        if signum == signal.SIGINT:  # a second Ctrl-C: the usual action
            signal.signal(signum, self._previous.get(signum, signal.default_int_handler))
        log.warning(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    def agreed(self, dist_ctx, group=None) -> int:
        """The signal any process received (0: none); every process gets the same answer. Distributed: one
        tiny host-side collective per step (group: distributed.host_group, so no GPU sync)."""
        return distributed.host_max(dist_ctx, self.received, group)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT: torchrun signals each worker's whole process group, and a
    loader worker that died of it would end the run before the checkpoint it is stopping for is written. They
    start with both blocked (see Trainer._batches), so one that arrives before this runs is dropped here."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, StopSignals.SIGNALS)


class Reporter:
    """metrics.jsonl on rank 0, plus tensorboard or wandb when --report-to asks."""

    def __init__(self, output_dir: Path, report_to: str | None, config: DictConfig, is_main: bool, resume_step: int):
        self.is_main, self.path = is_main, output_dir / "metrics.jsonl"
        self.writer = self.wandb = None
        if not is_main:
            return
        if self.path.exists():  # drop rows past the checkpoint we resume from: they will be redone
            rows = [r for r in self.path.read_text().splitlines() if _row_step(r) <= resume_step]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            # A resumed run redoes the steps after its checkpoint: drop their old events.
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)
        elif report_to == "wandb":
            import wandb
            id_file = output_dir / "wandb_run_id"  # a resumed run continues its wandb run, not a new one
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            atomic_write(id_file, lambda tmp: Path(tmp).write_text(run_id + "\n"))
            self.wandb = wandb.init(dir=str(output_dir), id=run_id, resume="allow",
                                    config=OmegaConf.to_container(config, resolve=True))

    def __call__(self, metrics: dict) -> None:
        if not self.is_main:
            return
        metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        with open(self.path, "a") as f:  # strict JSON: a non-finite number is null
            f.write(json.dumps(metrics, allow_nan=False) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if k != "step" and v is not None:
                    self.writer.add_scalar(f"train/{k}", v, metrics["step"])
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _row_step(row: str) -> float:
    """The step of a metrics row; a torn last line (a kill mid-write) counts as past every step."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def check_report_to(report_to: str | None) -> None:
    import importlib.util
    if report_to in (None, "", "none"):
        return
    needs = {"tensorboard": "tensorboard", "wandb": "wandb"}
    if report_to not in needs:
        raise ValueError(f"--report-to {report_to!r}; expected tensorboard or wandb")
    if importlib.util.find_spec(needs[report_to]) is None:
        raise ValueError(f"--report-to {report_to} needs the {needs[report_to]} package: pip install {needs[report_to]}")


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(output_dir: Path, config: DictConfig, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, progress: Progress, rng_states: list, keep: int) -> Path:
    """Write OUTPUT/checkpoints/<step>/ = config.yaml + model.pt (EMA, flat) + training_state.pt.

    The folder is assembled under a temporary name and renamed into place, so a kill at any moment leaves
    the earlier checkpoints intact and never a half-written one under a checkpoint name.
    """
    final = checkpoint_dir(output_dir, progress.step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_checkpoint(tmp, config, model, ema, optimizer, progress, rng_states)
    except BaseException:  # a full disk, say: no half folder left behind (the earlier checkpoints are intact)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():  # the same step written again (a resumed run that died right after saving)
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)  # until the new folder is in place, the old one stays complete on disk
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, config: DictConfig, model: torch.nn.Module, ema: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, progress: Progress, rng_states: list) -> None:
    atomic_write(tmp / "config.yaml", lambda p: Path(p).write_text(to_yaml(config)))
    atomic_save({k: v.detach().float().cpu() for k, v in ema.state_dict().items()}, tmp / MODEL_FILE)
    if os.environ.get(KILL_HOOK) == str(progress.step):
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_save({
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": progress.step,
        "epoch": progress.epoch,
        "position": progress.position,
        "skipped_images": progress.skipped_images,
        "window_loss": progress.window_loss,
        "window_steps": progress.window_steps,
        "world_size": len(rng_states),
        "batch_size": int(config.data.batch_size),
        "data_order": DATA_ORDER,
        "rng": rng_states,
    }, tmp / TRAINING_STATE)
    _fsync_dir(tmp)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_checkpoints(output_dir: Path) -> None:
    """Tidy OUTPUT/checkpoints after a kill: a step moved aside (.old-*) whose replacement never landed goes
    back; half-written folders (.tmp-*) and superseded ones are removed."""
    root = output_dir / CHECKPOINTS_DIR
    for old in root.glob(".old-*"):
        final = root / old.name.split("-")[1]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_training_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in list_checkpoints(output_dir) if (p / TRAINING_STATE).is_file()]
    return found[-1] if found else None


# ---------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, config: DictConfig, options: TrainOptions):
        self.config, self.options = config, options
        # Join the process group first: then a check that fails in one process (a data.root or an output
        # folder one node lacks) stops every process at once, instead of the others waiting for it.
        self.dist = distributed.init_distributed(timeout=COLLECTIVE_TIMEOUT)
        self.host_group = distributed.host_group(self.dist, COLLECTIVE_TIMEOUT)  # the per-step stop flag's
        error = None
        try:
            self._check(config, options)
        except Exception as e:  # noqa: BLE001 - re-raised in this process by agree, reported to the others
            error = e
        distributed.agree(self.dist, error, "checking the config and options")
        found = distributed.all_gather(self.dist, self.resume_from and self.resume_from.name)
        if len(set(found)) > 1:
            raise ValueError(f"the processes see different checkpoints in --output-dir {str(self.output_dir)!r} "
                             f"(newest per rank: {found}): on several nodes the output folder must be one that "
                             "they all share")
        error = None
        try:
            self._setup(config, options)
        except Exception as e:  # noqa: BLE001 - re-raised here, and reported to the other processes
            error = e
        try:
            distributed.agree(self.dist, error, "setting up the run")
        except BaseException as e:
            self._remove_new_output_dir()
            if e is error or isinstance(e, ValueError):  # agreed (the group works): the others wait for the
                try:                                     # removal, as torchrun ends the job when one exits
                    distributed.barrier(self.dist)
                except Exception:  # noqa: BLE001 - the setup error is the one to report
                    pass
            raise
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if self.dist.initialized else self.model)
        train = config.train
        if train.max_steps is not None:
            self.total_steps = int(train.max_steps)
        else:  # to the end of epoch `epochs`, counted in this layout's batches (a resume may change it)
            p, per_epoch = self.progress, self.sampler.batches_per_epoch
            self.total_steps = p.step + max(0, (int(train.epochs) - p.epoch) * per_epoch - p.position)

    def _check(self, config: DictConfig, options: TrainOptions) -> None:
        validate_train_config(config)
        amp_dtype = autocast_dtype(config.train.precision, self.dist.device)
        if config.train.attention == "flash_attn" and amp_dtype is None:
            raise ValueError(f"train.attention=flash_attn needs bf16 on CUDA, but this run computes in float32 on "
                             f"{self.dist.device} (train.precision={config.train.precision}); use "
                             "train.attention=auto or sdpa")
        check_report_to(options.report_to)
        for name in ("logging_steps", "checkpoint_steps"):
            value = getattr(options, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value!r}")
        self.output_dir = Path(options.output_dir)
        # The outermost folder this run will make (None: it exists), seen by every process before any makes it
        # (the agree after this check is a barrier).
        self._new_output_dir = check_writable_folder(self.output_dir, "--output-dir")
        self.resume_from = self._find_resume()
        if options.pretrained_model is not None:
            self._pretrained_path = Path(options.pretrained_model)
            if not self._pretrained_path.exists():
                raise ValueError(f"--pretrained-model {options.pretrained_model!r} does not exist")

    def _setup(self, config: DictConfig, options: TrainOptions) -> None:
        self.device = self.dist.device
        # The first step whose loss or gradient norm was not finite (-1: none), kept on the device: no host sync
        # of its own. Checked before every log row and every checkpoint, so no diverged weights are ever saved.
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        make_folder(self.output_dir, "--output-dir")
        setup_logging(self.output_dir, self.dist.is_main)
        if self.dist.is_main:  # a run killed while saving leaves a temporary folder behind
            recover_checkpoints(self.output_dir)
        self.amp_dtype = autocast_dtype(config.train.precision, self.device)
        self.seed = int(config.seed)

        self.dataset = build_dataset(config, seed=self.seed)
        self.sampler = ResumableShardSampler(len(self.dataset), int(config.data.batch_size), self.dist.rank,
                                             self.dist.world_size, seed=self.seed)  # checks the size first
        self.scheduler = scheduler_from_config(config)
        torch.manual_seed(self.seed)  # the same initial weights on every rank
        set_attention_backend(config.train.attention)
        self.model = build_model(config, device=self.device)
        self._check_classes(config)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        train = config.train
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(train.lr),
                                           weight_decay=float(train.weight_decay), betas=tuple(train.betas))
        self.progress = Progress()
        self.text = None
        if self.model.cross_attention_dim is not None:
            from .text_features import TextFeatures
            self.text = TextFeatures(config, self.device, self.output_dir)

        if options.resume and self.resume_from is None:
            self._log(f"--resume: no checkpoint in {str(self.output_dir / 'checkpoints')!r} yet; starting at step 0")
        if self.resume_from is not None:
            self._load_resume(self.resume_from)
        elif options.pretrained_model is not None:
            weights = self._pretrained_weights()
            state = read_state_dict(weights)
            built_from = "the training config's model.params"
            load_weights(self.model, state, source=options.pretrained_model, model_from=built_from)
            load_weights(self.ema, state, source=options.pretrained_model, model_from=built_from)
            self._log(f"model and EMA initialised from {weights}")

    # -- setup helpers
    def _remove_new_output_dir(self) -> None:
        """A run whose setup failed (a bad data.root, text encoder or --pretrained-model) leaves no folder
        behind if it made one: only an empty log and cache folder could be in it."""
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
        if self.dist.is_main and getattr(self, "_new_output_dir", None) is not None:
            shutil.rmtree(self._new_output_dir, ignore_errors=True)

    def _check_classes(self, config: DictConfig) -> None:
        """A class folder too many would train as the guidance null label (label num_classes); one more
        stops the run at the first batch that holds it. data.root=imagenet/ (not imagenet/train) is the
        usual cause."""
        found, expected = getattr(self.dataset, "num_classes", None), self.model.num_classes
        if found is None or not expected:
            return
        if found > expected:
            raise ValueError(f"data.root={config.data.root!r} has {found} class folders but "
                             f"model.params.num_classes={expected} (is data.root the train split's folder?)")
        if found < expected:
            self._log(f"data: {found} classes for a model with model.params.num_classes={expected}; "
                      f"labels {found}..{expected - 1} are never trained")

    def _find_resume(self) -> Path | None:
        latest = latest_training_checkpoint(self.output_dir)
        if self.options.resume:
            return latest
        if latest is not None:
            raise ValueError(f"{str(self.output_dir)!r} already holds checkpoints (newest {latest.name}); pass --resume "
                             "to continue that run, or choose another --output-dir")
        return None

    def _pretrained_weights(self) -> Path:
        path = self._pretrained_path
        if path.is_dir():
            from .checkpoint import find_weights
            return find_weights(resolve_pretrained(path))
        return path

    def _load_resume(self, folder: Path) -> None:
        saved = load_config(folder)
        # What the weights mean (model), what they were trained to do (scheduler, text encoder), and the seed
        # every random draw comes from: none may change under a resumed run.
        for key in ("model", "scheduler", "text_encoder", "seed"):
            old, new = saved.get(key), self.config.get(key)
            old, new = (OmegaConf.to_container(v) if isinstance(v, DictConfig) else v for v in (old, new))
            if old is not None and old != new:
                raise ValueError(f"cannot resume from {folder}: its {key} config {old} differs from this run's {new}; "
                                 f"resume with the same {key} settings, or start a new --output-dir "
                                 "(--pretrained-model takes the weights)")
        state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
        load_weights(self.model, state["model"], source=str(folder / TRAINING_STATE))
        load_weights(self.ema, read_state_dict(folder / MODEL_FILE), source=str(folder / MODEL_FILE))
        self.optimizer.load_state_dict(state["optimizer"])
        self._apply_optimizer_config()
        position = state["position"]
        saved = (state["world_size"], state.get("batch_size", int(self.config.data.batch_size)))
        now = (self.dist.world_size, int(self.config.data.batch_size))
        if saved != now:
            # Another layout shards the epoch differently: continue after as many images as were used.
            position = position * saved[0] * saved[1] // (now[0] * now[1])
            self._log(f"WARNING: resuming a run of {saved[0]} process(es) x batch {saved[1]} with {now[0]} x {now[1]}: "
                      f"the rest of epoch {state['epoch']} starts at batch {position}; the steps are no longer "
                      "those of an uninterrupted run")
        if state.get("data_order") != DATA_ORDER and position > 0:
            self._log(f"WARNING: {folder} was saved by a version that ordered each epoch otherwise "
                      f"({state.get('data_order', 'seed + epoch')!r}); the rest of epoch {state['epoch']} follows "
                      "the current order, so some of its images repeat and others are left out")
        # skipped_images counts every process's skips; rank 0 carries the total on, the others add their own
        self.progress = Progress(step=state["step"], epoch=state["epoch"], position=position,
                                 skipped_images=state["skipped_images"] if self.dist.is_main else 0,
                                 window_loss=float(state.get("window_loss", 0.0)),
                                 window_steps=int(state.get("window_steps", 0)))
        if state["world_size"] == self.dist.world_size:
            set_rng_state(state["rng"][self.dist.rank])
        self._log(f"resumed from {folder} at step {state['step']} (epoch {state['epoch']}, batch {position})")

    def _apply_optimizer_config(self) -> None:
        """After a resume, the optimizer runs with this config's lr, weight_decay and betas (its state, the
        Adam moments, is kept): the checkpoint's config must say what ran, and key=value overrides win."""
        train = self.config.train
        wanted = {"lr": float(train.lr), "weight_decay": float(train.weight_decay),
                  "betas": tuple(float(b) for b in train.betas)}
        changed = {}
        for group in self.optimizer.param_groups:
            changed.update({k: (group[k], v) for k, v in wanted.items() if group[k] != v})
            group.update(wanted)
        if changed:
            self._log("resuming with " + ", ".join(f"train.{k}={new} (the checkpoint ran with {old})"
                                                   for k, (old, new) in changed.items()))

    def total_skipped(self) -> int:
        """Unreadable images skipped so far by every process (a collective: every process calls it)."""
        return distributed.all_reduce_sum(self.dist, self.progress.skipped_images)

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            log.info(message)

    # -- one step
    def _batch_inputs(self, batch: dict, step: int):
        """Pack a loader batch for `step`: every random draw from generators seeded by (seed, rank, step)."""
        seed = step_seed(self.seed, self.dist.rank, step)
        cpu_gen = torch.Generator().manual_seed(seed)
        dev_gen = torch.Generator(self.device).manual_seed(seed)
        images = batch["images"].to(self.device, non_blocking=True)
        n = images.shape[0]
        stages = assign_stages(n, self.scheduler.num_stages, cpu_gen)
        timestep_index = torch.randint(0, self.scheduler.num_train_timesteps, (n,), generator=cpu_gen)
        drop = torch.rand(n, generator=cpu_gen) < float(self.config.train.label_dropout)
        packed = pack_batch(self.scheduler, images, stages, timestep_index,
                            lambda stage, shape: torch.randn(shape, generator=dev_gen, device=self.device),
                            self.model.patch_size)
        kwargs = {"grid_sizes": packed.grid_sizes}
        if self.text is None:
            labels = batch["labels"].clone()
            labels[drop] = self.model.null_label
            kwargs["class_labels"] = labels[packed.order].to(self.device)
        else:
            features, mask = self.text(batch["captions"], batch["indices"], drop)  # dropped: the empty prompt
            kwargs["encoder_hidden_states"] = features[packed.order.to(self.device)]
            kwargs["encoder_attention_mask"] = mask[packed.order.to(self.device)]
        return packed, kwargs

    def train_step(self, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        packed, kwargs = self._batch_inputs(batch, step)
        self.ddp.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            prediction = self.ddp(packed.tokens, packed.timesteps, **kwargs)
        loss = per_image_mse(prediction, packed.targets, packed.seqlens).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.config.train.grad_clip))
        self.optimizer.step()
        update_ema(self.ema, self.model, float(self.config.train.ema_decay))
        return loss.detach(), grad_norm.detach()

    # -- the loop
    def _loader(self) -> DataLoader:
        workers = int(self.config.data.num_workers)
        return DataLoader(self.dataset, batch_size=int(self.config.data.batch_size), sampler=self.sampler,
                          num_workers=workers, collate_fn=gather_examples, drop_last=True,
                          worker_init_fn=ignore_stop_signals if workers > 0 else None,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if workers > 0 else None)

    def _batches(self):
        """This epoch's batches. The loader's workers are forked with SIGTERM and SIGINT blocked: PyTorch gives
        a new worker a handler that dies of SIGTERM before ignore_stop_signals runs, and a signal in between
        would kill it (the main process gets the signal when the mask is restored)."""
        loader = self._loader()
        if loader.num_workers == 0:
            yield from loader
            return
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)
        try:
            batches = iter(loader)  # forks the workers
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        yield from batches

    def _readable(self, batch: dict) -> dict:
        if batch["skipped"]:
            self.progress.skipped_images += len(batch["skipped"])
            for reason in batch["skipped"]:
                log.warning(f"skipped unreadable image {reason} (rank {self.dist.rank})")
        if "images" not in batch:
            raise RuntimeError(f"every image of a batch was unreadable: {batch['skipped'][:4]}")
        return batch

    def fit(self) -> Path | None:
        p = self.progress
        opts = self.options
        self._log(f"training {sum(t.numel() for t in self.model.parameters()):,} parameters on {self.dist.world_size} "
                  f"process(es), device {self.device}, {len(self.dataset)} images, "
                  f"{self.sampler.batches_per_epoch} steps per epoch, {self.total_steps} steps in all")
        reporter = Reporter(self.output_dir, opts.report_to, self.config, self.dist.is_main, p.step)
        bar = None
        if self.dist.is_main and opts.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True)
        try:
            with StopSignals() as signals:
                last_saved = self._fit(reporter, bar, signals)
        finally:
            if bar is not None:
                bar.close()
            reporter.close()
        self._log(f"done: {p.step} steps; {self.total_skipped()} unreadable images skipped; "
                  f"checkpoints in {self.output_dir / 'checkpoints'}")
        self.check_replicas()
        distributed.barrier(self.dist)
        return last_saved

    def _fit(self, reporter: "Reporter", bar, signals: "StopSignals") -> Path | None:
        p, opts = self.progress, self.options
        last_saved = None
        # Every process starts from the saved window's mean; the all_reduce mean at the next log row keeps it.
        loss_sum = torch.full((), p.window_loss, device=self.device)
        window_steps, window_images, window_start = p.window_steps, 0, time.time()
        images_per_step = int(self.config.data.batch_size) * self.dist.world_size
        while p.step < self.total_steps:
            self.sampler.set_epoch(p.epoch, p.position)
            for batch in self._batches():
                loss, grad_norm = self.train_step(self._readable(batch), p.step)
                bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self._first_bad < 0)
                self._first_bad = torch.where(bad, torch.full_like(self._first_bad, p.step + 1), self._first_bad)
                p.step += 1
                p.position += 1
                loss_sum += loss
                window_steps += 1
                window_images += images_per_step
                if bar is not None:
                    bar.update(1)
                if p.step % opts.logging_steps == 0 or p.step == self.total_steps:
                    self._check_finite()
                    skipped = self.total_skipped()
                    if self.dist.initialized:
                        torch.distributed.all_reduce(loss_sum)
                        loss_sum /= self.dist.world_size
                    elapsed = max(time.time() - window_start, 1e-9)
                    metrics = {"step": p.step, "epoch": p.epoch, "loss": loss_sum.item() / window_steps,
                               "grad_norm": grad_norm.item(), "lr": self.optimizer.param_groups[0]["lr"],
                               "images_per_s": window_images / elapsed, "skipped_images": skipped}
                    reporter(metrics)
                    if self.dist.is_main:  # the console shows it in the progress bar, when there is one
                        log.info(f"step {p.step}: loss {metrics['loss']:.5f}, grad norm {metrics['grad_norm']:.4f}, "
                                 f"lr {metrics['lr']:.3g}, {metrics['images_per_s']:.1f} images/s",
                                 extra={"file_only": bar is not None})
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
                    loss_sum.zero_()
                    window_steps, window_images, window_start = 0, 0, time.time()
                stop = signals.agreed(self.dist, self.host_group)  # SIGTERM/SIGINT on any process: save here, then stop
                if stop or p.step % opts.checkpoint_steps == 0 or p.step == self.total_steps:
                    last_saved = self.checkpoint(loss_sum, window_steps)
                elif self.config.train.preview_steps and p.step % int(self.config.train.preview_steps) == 0:
                    self._safe_preview()
                if stop:
                    name = signal.Signals(stop).name
                    raise TrainingStopped(f"stopped by {name} at step {p.step}, checkpoint {last_saved or 'written'}: "
                                          f"continue with --resume", exit_code=128 + int(stop))
                if p.step >= self.total_steps:
                    break
            else:
                p.epoch += 1
                p.position = 0
        return last_saved

    def _check_finite(self) -> None:
        """Stop, on every process, once a loss or gradient norm was not finite (the weights are then NaN)."""
        first_bad = self._first_bad.clone()
        if self.dist.initialized:
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MAX)
        if int(first_bad) >= 0:
            newest = list_checkpoints(self.output_dir)
            raise TrainingStopped(
                f"training diverged: the loss or gradient norm was not finite at step {int(first_bad)} (on at least "
                f"one process); no checkpoint was written after it. The newest checkpoint is "
                f"{str(newest[-1]) if newest else 'none'}: resume from it with --resume and a lower train.lr, or "
                f"check the data")

    @torch.no_grad()
    def check_replicas(self) -> None:
        """Compare a checksum of the weights across ranks; DDP must keep them identical."""
        if not self.dist.initialized:
            return
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i, p in enumerate(self.model.parameters()):  # one parameter at a time: no copy of the whole model
            total[0] += p.detach().sum(dtype=torch.float64)
            total[1] += (i + 1) * p.detach().abs().sum(dtype=torch.float64)
        checksum = total.cpu()
        sums = [None] * self.dist.world_size
        torch.distributed.all_gather_object(sums, checksum.tolist())
        if any(s != sums[0] for s in sums):
            raise RuntimeError(f"model weights differ across ranks: checksums {sums}")
        self._log(f"weights identical across {self.dist.world_size} ranks (checksum {sums[0][1]:.10e})")

    def checkpoint(self, window_loss: torch.Tensor, window_steps: int) -> Path | None:
        """Save a checkpoint (rank 0 writes; every process takes part). window_loss: () loss summed over the
        open log window's window_steps steps on this process, saved as its mean over processes."""
        states = [rng_state()]
        if self.dist.initialized:
            states = [None] * self.dist.world_size
            torch.distributed.all_gather_object(states, rng_state())
        window_loss = window_loss.detach().clone()
        if self.dist.initialized:
            torch.distributed.all_reduce(window_loss)
            window_loss /= self.dist.world_size
        self.progress.window_loss, self.progress.window_steps = float(window_loss), window_steps
        path, error = None, None
        self._check_finite()
        skipped = self.total_skipped()
        if self.dist.is_main:
            progress = dataclasses.replace(self.progress, skipped_images=skipped)
            try:
                path = save_checkpoint(self.output_dir, self.config, self.model, self.ema, self.optimizer,
                                       progress, states, int(self.config.train.keep_checkpoints))
            except Exception as e:  # noqa: BLE001 - said plainly, on every process
                free = shutil.disk_usage(self.output_dir).free / 2**30
                error = TrainingStopped(f"writing checkpoint step {progress.step} in "
                                        f"{str(self.output_dir / 'checkpoints')!r} failed ({type(e).__name__}: {e}); "
                                        f"{free:.1f} GiB free there. The earlier checkpoints are intact: free "
                                        f"space and continue with --resume")
        distributed.agree(self.dist, error, "writing the checkpoint", TrainingStopped)
        if path is not None:
            self._log(f"saved checkpoint {path}")
            self._safe_preview()
        distributed.barrier(self.dist)
        return path

    def _safe_preview(self) -> None:
        """The preview grid is a convenience: a failure there is a warning, never the end of a long run."""
        try:
            self.preview()
        except Exception as e:  # noqa: BLE001
            log.warning(f"preview grid at step {self.progress.step} failed ({type(e).__name__}: {e}); training "
                        "goes on")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def preview(self) -> Path | None:
        """A grid of EMA samples: one row per class (class-to-image) or per prompt (text-to-image)."""
        if not self.dist.is_main:
            return None
        from .pipeline import PixelFlowPipeline
        cfg = self.config.preview
        pipe = PixelFlowPipeline(self.ema, self.scheduler, resolution=int(self.config.data.resolution),
                                 autocast_dtype=self.amp_dtype)
        per_row = int(cfg.images_per_class)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        common = dict(num_inference_steps=int(cfg.num_inference_steps), guidance_scale=float(cfg.guidance_scale),
                      generator=generator, output_type="uint8")
        if self.text is None:
            classes = min(int(cfg.num_classes), self.model.num_classes,
                          getattr(self.dataset, "num_classes", self.model.num_classes))
            labels = [c for c in range(classes) for _ in range(per_row)]
            images = pipe(class_labels=labels, **common)
        else:
            prompts = list(cfg.prompts) or ["" for _ in range(2)]
            pipe.text_encoder, pipe.tokenizer = self.text.encoder, self.text.tokenizer
            pipe.max_text_length = self.text.max_length
            images = pipe(prompt=prompts, num_images_per_prompt=per_row, **common)
        path = self.output_dir / "samples" / f"{self.progress.step:07d}.png"
        atomic_write(path, lambda tmp: image_grid(images, per_row).save(tmp, format="PNG"))
        return path


def train(config: DictConfig, options: TrainOptions) -> Path | None:
    """Run (or resume) training; returns the last checkpoint folder written on rank 0."""
    try:
        return Trainer(config, options).fit()
    finally:
        distributed.cleanup()
