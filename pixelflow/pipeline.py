"""The cascade sampler: the one sampling loop that sample_ddp.py, the demo and training previews call.

Stage 0 starts from Gaussian noise at R / 2^(S-1); every later stage upsamples (nearest, x2), renoises with
block noise and integrates its own flow from in-stage time 0 to 1 (SPEC section 5).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .scheduler import PixelFlowScheduler
from .scheduler.scheduling_pixelflow import randn
from .text import DEFAULT_MAX_LENGTH

if TYPE_CHECKING:  # omegaconf is needed only to load a pretrained folder (from_pretrained imports it then)
    from omegaconf import DictConfig

SOLVERS = ("euler", "dopri5")
OUTPUT_TYPES = ("np", "pil", "pt", "uint8")
# Class-to-image guidance ramps over the stages: w_k = 1 + (g - 1) * kappa_k. The release's values for four
# stages; for other stage counts kappa rises linearly from 0 at the coarsest stage to 1 at the finest.
RELEASE_GUIDANCE_RAMP = {4: (0.0, 1.0 / 6.0, 2.0 / 3.0, 1.0)}
DOPRI5_ATOL, DOPRI5_RTOL = 1e-6, 1e-3


def guidance_ramp(num_stages: int) -> tuple[float, ...]:
    """kappa_k per stage for class-to-image guidance (see RELEASE_GUIDANCE_RAMP)."""
    if num_stages in RELEASE_GUIDANCE_RAMP:
        return RELEASE_GUIDANCE_RAMP[num_stages]
    if num_stages == 1:
        return (1.0,)
    return tuple(k / (num_stages - 1) for k in range(num_stages))


GUIDANCE_SCHEDULES = ("ramp", "constant")


def steps_per_stage(steps: Sequence[int], num_stages: int, name: str = "num_inference_steps") -> list[int]:
    """Euler steps for every stage from one count (used at every stage) or one count per stage.

    The one rule behind the pipeline's num_inference_steps, sample_ddp's --num-steps-per-stage and the demo's
    steps box; name is how the caller's user knows the value. Raises ValueError naming the bad value.
    """
    steps = [int(s) for s in steps]
    if len(steps) not in (1, num_stages):
        raise ValueError(f"{name} takes one step count (used at every stage) or one per stage ({num_stages} "
                         f"stage{'s' * (num_stages != 1)}), got {len(steps)} values {steps}")
    if min(steps) < 1:
        raise ValueError(f"{name} must be >= 1 at every stage, got {steps}")
    return steps * num_stages if len(steps) == 1 else steps


def stage_guidance_weights(guidance_scale: float, num_stages: int, class_conditional: bool,
                           schedule: str = "ramp") -> list[float]:
    """Per-stage guidance weights w_k. Class-to-image ramps (guidance_ramp); text-to-image, and the schedule
    "constant" (the paper's Euler setting for class-to-image), use g at every stage.

    As in the release, guidance_scale 0 means no guidance (every w_k = 1).
    """
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")
    if guidance_scale == 0:
        return [1.0] * num_stages
    if not class_conditional or schedule == "constant":
        return [float(guidance_scale)] * num_stages
    return [1.0 + (guidance_scale - 1.0) * kappa for kappa in guidance_ramp(num_stages)]


class PixelFlowPipeline:
    """Samples images from a PixelFlowModel with the cascade of PixelFlowScheduler.

    model: the network; scheduler: its stage tables; resolution: the default output size.
    text_encoder / tokenizer: a T5 encoder and its tokenizer for text-to-image models.
    autocast_dtype: e.g. torch.bfloat16 to run the network under autocast on CUDA (None = float32).
    """

    def __init__(self, model: torch.nn.Module, scheduler: PixelFlowScheduler, resolution: int = 256,
                 text_encoder=None, tokenizer=None, max_text_length: int = DEFAULT_MAX_LENGTH,
                 autocast_dtype: torch.dtype | None = None, config: DictConfig | None = None):
        self.model = model
        self.scheduler = scheduler
        self.resolution = resolution
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.autocast_dtype = autocast_dtype
        self.config = config
        self.denoiser = model  # what the sampling loop calls; pixelflow.fast may swap in a compiled copy

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        # pipe.model = other: sampling uses it (a plain denoiser follows; a fast one is rebuilt for it).
        old = self.__dict__.get("_model")
        self._model = model
        if old is not None and self.__dict__.get("denoiser") is old:
            self.denoiser = model

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu", text_encoder=None,
                        tokenizer=None, autocast_dtype: torch.dtype | None = None) -> "PixelFlowPipeline":
        """Load a pretrained folder: config.yaml + model.pt (flat, or wrapped as {"model"}/{"ema"}) or
        model.safetensors. Text-to-image folders also need a T5 encoder and tokenizer: pass them, or the
        config's text encoder (text_encoder.name, default google/flan-t5-xl) is loaded with transformers."""
        from .checkpoint import load_pretrained, scheduler_from_config, summarize_config

        model, config = load_pretrained(folder, device=device)
        scheduler = scheduler_from_config(config)
        resolution = summarize_config(config).resolution
        max_length = DEFAULT_MAX_LENGTH
        if model.cross_attention_dim is not None:
            from .text import load_text_encoder, text_encoder_settings
            name, max_length = text_encoder_settings(config)
            text_encoder, tokenizer = load_text_encoder(name, device=device, text_encoder=text_encoder,
                                                        tokenizer=tokenizer, feature_dim=model.cross_attention_dim)
        return cls(model, scheduler, resolution=resolution, text_encoder=text_encoder, tokenizer=tokenizer,
                   max_text_length=max_length, autocast_dtype=autocast_dtype, config=config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def class_conditional(self) -> bool:
        return getattr(self.model, "num_classes", 0) > 0

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this: patch_size * 2^(stages-1)."""
        return self.model.patch_size * 2 ** (self.scheduler.num_stages - 1)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features (B, L, C) and padding mask (B, L) (1 = keep), padded to max_text_length."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder; pass text_encoder= and tokenizer= to from_pretrained")
        from .text import encode_text
        return encode_text(self.text_encoder, self.tokenizer, list(prompts), self.max_text_length, self.device)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor | int | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | Sequence[int] = 30,
        guidance_scale: float = 2.4,
        guidance_schedule: str = "ramp",
        guidance_weights: Sequence[float] | None = None,
        shift: float = 1.0,
        solver: str = "euler",
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        stage_noise: Sequence[torch.Tensor] | None = None,
        output_type: str = "np",
        progress: bool = False,
        atol: float = DOPRI5_ATOL,
        rtol: float = DOPRI5_RTOL,
    ):
        """Sample images.

        class_labels: (B,) ints in [0, num_classes) for class-to-image; prompt: str or list for text-to-image.
        num_inference_steps: Euler steps, one int for every stage or one per stage.
        guidance_scale: g >= 0; per-stage weights from stage_guidance_weights with guidance_schedule ("ramp",
        the release's class-to-image ramp, or "constant": g at every stage), unless guidance_weights is given.
        generator: one torch.Generator, or one per image (image b's noise then depends on generator[b] only).
        latents: (B, 3, H/2^(S-1), W/2^(S-1)) initial noise; stage_noise: block noise for stages 1..S-1
        at each stage's size, (B or more, 3, h, w). Rows past B never reach an image. The one place they are
        read is dopri5 with guidance, where, as in the release, rows B..2B renoise the doubled ODE state that
        only enters the adaptive step size; with fewer rows, image j reuses its own row j there, so the given
        noise alone decides the result.
        Returns per output_type: "np" (B, H, W, 3) float32 in [0, 1]; "pt" the same as a (B, H, W, 3) tensor
        (channels last, like "np", not the (B, 3, H, W) of the network);
        "uint8" (B, H, W, 3) uint8 numpy; "pil" a list of PIL images.
        Raises ValueError for bad input, before any network call, and FloatingPointError when the samples hold
        NaN or infinite values (they would otherwise come out as black pixels).
        """
        S = self.scheduler.num_stages
        height = self.resolution if height is None else height
        width = self.resolution if width is None else width
        self._check_call(height, width, guidance_scale, solver, output_type, shift)
        weights = self._guidance_weights(guidance_scale, guidance_schedule, guidance_weights)
        if solver == "dopri5":
            atol, rtol = _tolerance("atol", atol), _tolerance("rtol", rtol)
        self._check_weight_dtype()
        if torch.is_tensor(latents) and not torch.isfinite(latents.to(torch.float32)).all():
            raise ValueError("latents hold NaN or infinite values (in float32)")
        height, width = int(height), int(width)
        steps = self._check_steps(num_inference_steps)
        make_conditions, batch = self._conditions(class_labels, prompt, negative_prompt, num_images_per_prompt)
        generators = self._check_generators(generator, batch)
        scale = 2 ** (S - 1)
        shape = (batch, 3, height // scale, width // scale)
        if latents is not None:
            self._check_latents(latents, shape, height, width)
        if stage_noise is not None:  # rows past 2B are never read (past B, only by dopri5's shadow)
            self._check_stage_noise(stage_noise, batch, *shape[-2:])
        conditions = make_conditions()  # the text encoder runs once every input has passed its checks
        if latents is None:
            z = self._randn(shape, generators, self.device)
        else:
            z = latents.to(device=self.device, dtype=torch.float32)

        # dopri5 as the release runs it: whenever guidance is on, the ODE state is doubled and the second half
        # (the "shadow") follows the first half's velocity but gets its own block noise at every stage. It never
        # reaches the output; it only enters the adaptive step-size norm, so keeping it reproduces the release.
        shadowed = solver == "dopri5" and (any(w != 1.0 for w in weights) if guidance_weights is not None
                                           else guidance_scale > 0)
        shadow = z if shadowed else None
        bar = _progress(sum(steps) if solver == "euler" else S, progress)
        for stage in range(S):
            if stage > 0:
                rows = 2 * batch if shadowed else batch
                noise = self._stage_noise(stage, rows, z.shape, generators,
                                          None if stage_noise is None else stage_noise[stage - 1])
                z = self.scheduler.renoise(z, stage, noise[:batch])
                if shadowed:
                    shadow = self.scheduler.renoise(shadow, stage, noise[batch:])
            velocity = self._velocity_fn(z.shape, conditions, weights[stage])
            if solver == "euler":
                z = self._euler(z, stage, steps[stage], shift, velocity, bar)
            else:
                z, shadow = self._dopri5(z, shadow, stage, velocity, atol, rtol)
                bar.update(1)
        bar.close()
        if not torch.isfinite(z).all():  # one sync per call; NaN would pass the clamp and turn into black uint8 pixels
            raise FloatingPointError(f"sampling produced NaN or infinite values ({int((~torch.isfinite(z)).sum())} of "
                                     f"{z.numel()}): are the model's weights finite? Under bf16 autocast, try float32")
        return self._output(z, output_type)

    def _guidance_weights(self, guidance_scale: float, schedule: str,
                          given: Sequence[float] | None) -> list[float]:
        """w_k per stage: the given ones (checked), else from guidance_scale and the schedule."""
        S = self.scheduler.num_stages
        weights = stage_guidance_weights(guidance_scale, S, self.class_conditional, schedule)
        if given is not None:
            weights = [float(w) for w in given]
            if len(weights) != S:
                raise ValueError(f"guidance_weights needs one weight per stage ({S}), got {len(weights)}")
            if not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(f"guidance_weights must be finite numbers >= 0, got {weights}")
        return weights

    @staticmethod
    def _check_latents(latents, shape: tuple[int, ...], height: int, width: int) -> None:
        """Given stage-0 noise must be a tensor of shape (B, 3, H/2^(S-1), W/2^(S-1))."""
        if not torch.is_tensor(latents):
            raise ValueError(f"latents must be a tensor (B, 3, H, W), got {type(latents).__name__}")
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must be {shape} for {height}x{width}, got {tuple(latents.shape)}")

    def _stage_noise(self, stage: int, rows: int, shape, generators, given: torch.Tensor | None) -> torch.Tensor:
        """Block noise (rows, C, 2h, 2w) for the start of `stage`: the given tensor's first rows, else drawn.

        With a shadow (dopri5 with guidance) rows = 2B: rows B..2B renoise the shadow; a list of
        per-image generators then draws the B main rows first, then the B shadow rows.
        """
        b, c, h, w = shape
        h, w = 2 * h, 2 * w
        if given is not None:  # shapes were checked up front (_check_stage_noise)
            given = given.to(device=self.device, dtype=torch.float32)
            if given.shape[0] >= rows:
                return given[:rows]
            # Too few rows for the shadow: image j's missing shadow row is its own main row, so the caller's
            # noise alone decides the result (with no shadow rows at all, the shadow stays an exact copy).
            n = given.shape[0]
            return torch.cat([given, given[n - b:b]])
        if isinstance(generators, list) and rows > b:
            return torch.cat([self._block_noise(b, c, h, w, generators),
                              self._block_noise(b, c, h, w, generators)])
        return self._block_noise(rows, c, h, w, generators)

    def _euler(self, z, stage, steps, shift, velocity, bar) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, stage, shift=shift)
        times = self.scheduler.timesteps.tolist()  # host floats: no device syncs in the loop
        grid = self.scheduler.t.tolist()
        for i, model_time in enumerate(times):
            z = z + (grid[i + 1] - grid[i]) * velocity(z, model_time)
            bar.update(1)
        return z

    def _dopri5(self, z, shadow, stage, velocity, atol, rtol) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Integrate in-stage time s from 0 to 1 with adaptive Dormand-Prince (torchdiffeq)."""
        from torchdiffeq import odeint

        batch = z.shape[0]

        def rhs(s: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            v = velocity(state[:batch], self.scheduler.model_time(stage, s))
            return v if shadow is None else torch.cat([v, v])

        state = z if shadow is None else torch.cat([z, shadow])
        span = torch.tensor([0.0, 1.0], device=z.device, dtype=torch.float32)
        try:
            end = odeint(rhs, state, span, method="dopri5", atol=atol, rtol=rtol)[-1]
        except AssertionError as e:  # torchdiffeq's "underflow in dt": NaN velocities shrink the step to zero
            if "underflow" not in str(e):
                raise
            raise FloatingPointError(f"dopri5 failed at stage {stage} ({e}): the velocity is most likely NaN or "
                                     "infinite; are the model's weights finite? Under bf16 autocast, try float32") from None
        return end[:batch], (None if shadow is None else end[batch:])

    def _velocity_fn(self, shape, conditions: dict, weight: float):
        """v(z, T) for one stage: guided when weight != 1. The release runs the null batch whenever g > 0; at a
        weight of exactly 1 we skip it, since v_null + 1 * (v_cond - v_null) is v_cond up to float rounding."""
        guided = weight != 1.0
        batch = shape[0]
        cond = conditions["cond"]
        both = conditions["both"] if guided else None
        device = self.device
        self._follow_fast_path()

        def velocity(z: torch.Tensor, model_time) -> torch.Tensor:
            inputs = torch.cat([z, z]) if guided else z
            n = inputs.shape[0]
            if torch.is_tensor(model_time):
                timestep = model_time.to(device=device, dtype=torch.float32).expand(n)
            else:
                timestep = torch.full((n,), model_time, device=device, dtype=torch.float32)
            with self._autocast():
                v = self.denoiser(inputs, timestep, **(both if guided else cond)).float()
            if not guided:
                return v
            v_cond, v_null = v[:batch], v[batch:]
            return v_null + weight * (v_cond - v_null)

        return velocity

    # ------------------------------------------------------------------ inputs
    def _conditions(self, class_labels, prompt, negative_prompt, num_images_per_prompt):
        """Check the conditions -> (make, B): make() gives the model keyword arguments for the conditional batch
        ("cond") and the [cond; null] batch ("both"), running the text encoder only when called."""
        device = self.device
        if self.class_conditional:
            if prompt is not None:
                raise ValueError("this is a class-to-image model: pass class_labels, not prompt")
            if negative_prompt is not None:
                raise ValueError("this is a class-to-image model: negative_prompt would be ignored (guidance "
                                 "uses the null label)")
            if class_labels is None:
                raise ValueError("class_labels is required for a class-to-image model")
            try:
                labels = torch.as_tensor(class_labels)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"class_labels must be integers (class indices), got {class_labels!r:.80}; "
                                 "pixelflow.imagenet_classes maps ImageNet names to indices") from None
            if labels.ndim > 1 and any(d != 1 for d in labels.shape[1:]):  # (B, 1) is still one per image
                raise ValueError(f"class_labels must be one label per image, (B,), got shape {tuple(labels.shape)}")
            labels = labels.reshape(-1)
            if labels.numel() == 0:
                raise ValueError("class_labels is empty")
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(f"class labels must be integers, got {labels.tolist()[:8]}")
            num_images_per_prompt = _count(num_images_per_prompt)
            labels = labels.long()
            num_classes = self.model.num_classes
            bad = labels[(labels < 0) | (labels >= num_classes)]
            if bad.numel():
                raise ValueError(f"class label {bad[0].item()} is outside [0, {num_classes}); "
                                 f"the model has {num_classes} classes")
            labels = labels.repeat_interleave(num_images_per_prompt).to(device)
            null = torch.full_like(labels, self.model.null_label)
            conditions = {"cond": {"class_labels": labels}, "both": {"class_labels": torch.cat([labels, null])}}
            return (lambda: conditions), len(labels)

        if getattr(self.model, "cross_attention_dim", None) is None:
            raise ValueError("the model is neither class- nor text-conditional (num_classes 0 and no "
                             "cross_attention_dim): the cascade samples conditional models only")
        if class_labels is not None:
            raise ValueError("this is a text-to-image model: pass prompt, not class_labels")
        if prompt is None:
            raise ValueError("prompt is required for a text-to-image model")
        prompts = _strings("prompt", prompt)
        if not prompts:
            raise ValueError("prompt is an empty list; pass at least one prompt")
        num_images_per_prompt = _count(num_images_per_prompt)
        negative = "" if negative_prompt is None else negative_prompt
        negatives = [negative] * len(prompts) if isinstance(negative, str) else _strings("negative_prompt", negative)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        batch = len(prompts) * num_images_per_prompt

        def make() -> dict:
            features, mask = self.encode_prompt(prompts + negatives)
            features = features.repeat_interleave(num_images_per_prompt, dim=0)
            mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
            cond = {"encoder_hidden_states": features[:batch], "encoder_attention_mask": mask[:batch]}
            both = {"encoder_hidden_states": features, "encoder_attention_mask": mask}
            return {"cond": cond, "both": both}

        return make, batch

    def _check_steps(self, num_inference_steps) -> list[int]:
        if torch.is_tensor(num_inference_steps) and not num_inference_steps.is_floating_point():
            num_inference_steps = num_inference_steps.tolist()
        given = [num_inference_steps] if np.ndim(num_inference_steps) == 0 else list(num_inference_steps)
        if not given or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in given):
            raise ValueError(f"num_inference_steps must be an int (used at every stage) or one int per stage, "
                             f"got {num_inference_steps!r}")
        return steps_per_stage(given, self.scheduler.num_stages)

    def _check_call(self, height, width, guidance_scale, solver, output_type, shift) -> None:
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < m or value % m:
                raise ValueError(f"{name}={value!r} must be a positive multiple of {m} "
                                 f"(patch_size {self.model.patch_size} x 2^(stages-1))")
        for name, value in (("guidance_scale", guidance_scale), ("shift", shift)):
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not (guidance_scale >= 0 and math.isfinite(guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
        if not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"shift must be a finite number > 0, got {shift}")

    def _check_weight_dtype(self) -> None:
        dtype = self.model.proj_out_2.weight.dtype
        if dtype != torch.float32 and (self.autocast_dtype is None or self.autocast_dtype == torch.float32):
            raise ValueError(f"the model's weights are {dtype}, but the pipeline runs the network in float32 "
                             "(autocast_dtype None): keep the model in float32 (pipe.model.float()), or set "
                             "pipe.autocast_dtype to torch.bfloat16 or torch.float16 for half weights")

    def _check_stage_noise(self, stage_noise, batch: int, h0: int, w0: int) -> None:
        """Every stage's block noise is checked before any sampling work."""
        S = self.scheduler.num_stages
        if torch.is_tensor(stage_noise) or not isinstance(stage_noise, (list, tuple)):
            raise ValueError(f"stage_noise must be a list of {S - 1} tensors (stages 1..{S - 1}), "
                             f"got {type(stage_noise).__name__}")
        if len(stage_noise) != S - 1:
            raise ValueError(f"stage_noise needs {S - 1} tensors (stages 1..{S - 1}), got {len(stage_noise)}")
        for k, given in enumerate(stage_noise, start=1):
            expected = (batch, 3, h0 << k, w0 << k)
            if not torch.is_tensor(given) or given.ndim != 4 or given.shape[0] < batch \
                    or tuple(given.shape[1:]) != expected[1:]:
                got = tuple(given.shape) if torch.is_tensor(given) else type(given).__name__
                raise ValueError(f"stage_noise[{k - 1}] (stage {k}) must be at least {expected}, got {got}")
            if not torch.isfinite(given[:2 * batch].to(torch.float32)).all():
                raise ValueError(f"stage_noise[{k - 1}] (stage {k}) holds NaN or infinite values (in float32)")

    def _check_generators(self, generator, batch: int):
        if generator is None or isinstance(generator, torch.Generator):
            return generator
        if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator must be a torch.Generator or a list of them (one per image), "
                             f"got {generator!r}"[:300])
        generators = list(generator)
        if len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for {batch} images; pass one, or one per image")
        return generators

    def _randn(self, shape, generators, device) -> torch.Tensor:
        if isinstance(generators, list):
            return torch.cat([randn((1, *shape[1:]), g, device, torch.float32) for g in generators])
        return randn(shape, generators, device, torch.float32)

    def _block_noise(self, b, c, h, w, generators) -> torch.Tensor:
        return self.scheduler.sample_block_noise(b, c, h, w, generator=generators, device=self.device)

    def _follow_fast_path(self) -> None:
        """A fast path set by pixelflow.fast.accelerate follows later changes of the pipeline (fast.follow)."""
        if self.denoiser is not self.model and getattr(self.denoiser, "follows_pipeline", False):
            from .fast import follow
            follow(self)

    def _autocast(self):
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def _output(z: torch.Tensor, output_type: str):
        images = (z / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().contiguous()  # (B, H, W, 3) in memory too
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.cpu().numpy()
        pixels = (images * 255).round().to(torch.uint8).cpu().numpy()
        if output_type == "uint8":
            return pixels
        from PIL import Image
        return [Image.fromarray(p) for p in pixels]


def _tolerance(name: str, value) -> float:
    """A dopri5 tolerance: a finite real number > 0 (a Python, numpy or 0-d torch number)."""
    if torch.is_tensor(value) and value.numel() == 1 and not (value.is_complex() or value.dtype == torch.bool):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(value) -> int:
    """num_images_per_prompt as an int >= 1 (numpy integers too, as height and steps take them)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {value!r}")
    return int(value)


def _strings(name: str, value) -> list[str]:
    """A prompt argument as a list of strings: one string, or a list or tuple of them."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r:.80}")
    return list(value)


def _progress(total: int, enabled: bool):
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc="sampling", unit="step", leave=False)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
