"""The Gradio demo behind app.py: load a pretrained folder, check a request against the demo's caps, sample
with the one pipeline, and lay out the page.

The checkpoint's config decides the mode: a class-to-image model (num_classes > 0) gets a searchable class
dropdown, a text-to-image model a prompt and a negative prompt. The resolution is the checkpoint's.
`DemoGenerator.generate` is the request handler; it is plain Python (tests call it without a browser) and
raises gr.Error with the bad value and the allowed range for every input it refuses.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from .checkpoint import check_sampling_resolution, load_config, resolve_pretrained, summarize_config
from .distributed import resolve_device
from .imagenet_classes import class_names
from .pipeline import SOLVERS, PixelFlowPipeline, steps_per_stage

DEFAULT_MAX_IMAGES = 8        # images per request
DEFAULT_MAX_STEPS = 100       # Euler steps per stage
DEFAULT_MAX_QUEUE = 16        # requests waiting in line; more are turned away with a message
MAX_SEED = 2**31 - 1
RANDOM_SEED = -1              # seed value that asks for a fresh random seed
MAX_PROMPT_CHARS = 2000
GUIDANCE_RANGE = (0.0, 20.0)  # 0 = no guidance (the pipeline's convention)
SHIFT_RANGE = (0.1, 10.0)
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = {True: 2.4, False: 4.0}  # class-to-image (release FID setting), text-to-image
DEFAULT_IMAGENET_CLASS = 207  # golden retriever: the class picked when the page opens on an ImageNet model
# Small checkpoints make images of a few dozen pixels; draw their upscaled pixels as squares, not blur.
CSS = "#pf-gallery img { image-rendering: pixelated; }"


@dataclass(frozen=True)
class DemoLimits:
    """Per-request caps that keep a shared demo responsive."""
    max_images: int = DEFAULT_MAX_IMAGES
    max_steps: int = DEFAULT_MAX_STEPS
    max_queue: int = DEFAULT_MAX_QUEUE

    def __post_init__(self):
        for name in ("max_images", "max_steps", "max_queue"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_demo_pipeline(checkpoint: str | Path, device: str | torch.device | None = None,
                       class_cond: bool = False, fast: bool = True) -> PixelFlowPipeline:
    """Load a pretrained folder (or a training run's newest checkpoint) for the demo.

    class_cond: the release's --class_cond flag. The config decides the mode; the flag, when given, must agree.
    On CUDA the network runs under bfloat16 autocast, through the fast path unless fast=False (compiled once
    for every batch size, since requests vary).
    """
    folder = resolve_pretrained(checkpoint)
    config = load_config(folder)
    check_sampling_resolution(config, str(folder / "config.yaml"))  # every request samples at this size
    num_classes = summarize_config(config).num_classes
    if class_cond and num_classes <= 0:
        raise ValueError(f"--class_cond was given but {str(folder)!r} is a text-to-image checkpoint "
                         f"(model.params.num_classes = {num_classes}); drop --class_cond, the config decides the mode")
    device = resolve_device(device, local_rank=0)  # None: CUDA when available; a bare "cuda": the first GPU
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device} is not supported; expected cpu, cuda or cuda:N")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    pipe = PixelFlowPipeline.from_pretrained(folder, device=device, autocast_dtype=autocast)
    if fast:
        from .fast import accelerate
        accelerate(pipe, precision="keep", compile_dynamic=True)
    return pipe


class DemoGenerator:
    """Turns one request from the page into one pipeline call. One request samples at a time (lock)."""

    def __init__(self, pipe: PixelFlowPipeline, limits: DemoLimits = DemoLimits(), name: str = ""):
        self.pipe = pipe
        self.limits = limits
        self.name = name
        self.num_stages = pipe.scheduler.num_stages
        self.labels = class_names(pipe.model.num_classes) if pipe.class_conditional else []
        self._lock = threading.Lock()  # the scheduler keeps per-call state: never sample two requests at once

    @property
    def class_conditional(self) -> bool:
        return self.pipe.class_conditional

    # ------------------------------------------------------------------ classes
    def class_choices(self) -> list[tuple[str, int]]:
        """(shown text, label) per class; the text carries the label number so both can be searched."""
        return [(name if name.startswith("class ") else f"{i}: {name}", i) for i, name in enumerate(self.labels)]

    def class_index(self, choice: Any) -> int:
        """A class label from the dropdown's value (an int), its shown text, a number, or a class name
        ("golden retriever", any of the comma-separated synonyms, case-insensitive)."""
        n = len(self.labels)
        if isinstance(choice, float) and choice.is_integer():
            choice = int(choice)
        if isinstance(choice, str) and choice.strip():
            text = choice.strip()
            shown = {label.lower(): i for label, i in self.class_choices()}
            number = re.fullmatch(r"(?:class\s*)?(\d+)(?::.*)?", text.lower())  # "207", "class 3", "207: ..."
            if text.lower() in shown:
                return shown[text.lower()]
            if not number:
                return self._class_by_name(text)
            choice = int(number.group(1))
        if isinstance(choice, bool) or not isinstance(choice, numbers.Integral):
            raise gr.Error(f"pick a class from the list (got {choice!r})")
        if not 0 <= choice < n:
            raise gr.Error(f"class {choice} is outside 0..{n - 1}: this checkpoint has {n} classes")
        return int(choice)

    def _class_by_name(self, text: str) -> int:
        key = text.lower()
        hits = [i for i, name in enumerate(self.labels)
                if key == name.lower() or key in (s.strip().lower() for s in name.split(","))]
        if len(hits) == 1:
            return hits[0]
        if hits:
            options = "; ".join(f"{i}: {self.labels[i]}" for i in hits)
            raise gr.Error(f"class name {text!r} is ambiguous ({options}); pick one by number")
        close = difflib.get_close_matches(key, [name.lower() for name in self.labels], n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise gr.Error(f"no class named {text!r} among this checkpoint's {len(self.labels)} classes{hint}")

    # ------------------------------------------------------------------ request checks
    def parse_steps(self, steps: Any) -> list[int]:
        """Steps per stage from one number (every stage) or one per stage ("10, 10, 20, 30"), each in
        1..max_steps."""
        S, cap = self.num_stages, self.limits.max_steps
        if isinstance(steps, (int, float)) and not isinstance(steps, bool):
            values = [steps]
        else:
            parts = [p for p in re.split(r"[,\s]+", str(steps or "").strip()) if p]
            try:
                values = [float(p) for p in parts]
            except ValueError:
                raise gr.Error(f"steps per stage must be one whole number or {S} of them separated by commas "
                               f"(e.g. {self._steps_example}), got {steps!r}") from None
        if not values:
            raise gr.Error(f"give one step count for every stage or {S} of them (one per stage), got {steps!r}")
        if any(not math.isfinite(v) or not float(v).is_integer() for v in values):
            raise gr.Error(f"steps per stage must be whole numbers, got {steps!r}")
        bad = [int(v) for v in values if not 1 <= v <= cap]
        if bad:
            raise gr.Error(f"steps per stage must be between 1 and {cap} (this demo's cap), got {bad[0]}")
        try:
            return steps_per_stage(values, S, "steps per stage")
        except ValueError as error:
            raise gr.Error(f"{error}; e.g. {self._steps_example}") from None

    @property
    def _steps_example(self) -> str:
        per_stage = ",".join(["10"] * (self.num_stages - 1) + ["30"])
        return "30" if self.num_stages == 1 else f"30 or {per_stage}"

    def _check_number(self, name: str, value: Any, low: float, high: float) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise gr.Error(f"{name} must be a number, got {value!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise gr.Error(f"{name} must be between {low:g} and {high:g}, got {value:g}")
        return value

    def _check_int(self, name: str, value: Any, low: int, high: int, why: str = "") -> int:
        number = self._check_number(name, value, -math.inf, math.inf)
        if not number.is_integer():
            raise gr.Error(f"{name} must be a whole number, got {value!r}")
        if not low <= number <= high:
            raise gr.Error(f"{name} must be between {low} and {high}{why}, got {int(number)}")
        return int(number)

    # ------------------------------------------------------------------ the request
    def generate(self, condition: Any, negative_prompt: str = "", steps: Any = DEFAULT_STEPS,
                 guidance_scale: Any = DEFAULT_GUIDANCE[True], shift: Any = 1.0, solver: str = "euler", seed: Any = 0,
                 num_images: Any = 1) -> tuple[list[tuple[Image.Image, str]], str]:
        """Sample num_images images -> (gallery items (image, caption), a line giving the settings and time).

        condition: a class (see class_index) for class-to-image, the prompt for text-to-image.
        seed: image i uses seed + i, so an image does not change when more are asked for (up to one level of
        rounding under bf16 on CUDA, where the batch size changes the kernels); -1 draws a seed.
        """
        steps_per_stage = self.parse_steps(steps)
        guidance_scale = self._check_number("guidance", guidance_scale, *GUIDANCE_RANGE)
        shift = self._check_number("shift", shift, *SHIFT_RANGE)
        if solver not in SOLVERS:
            raise gr.Error(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        num_images = self._check_int("number of images", num_images, 1, self.limits.max_images,
                                     " (this demo's cap)")
        seed = RANDOM_SEED if seed is None or seed == "" else seed
        seed = self._check_int("seed", seed, RANDOM_SEED, MAX_SEED - self.limits.max_images,
                               f" ({RANDOM_SEED} = random)")
        if seed == RANDOM_SEED:
            seed = secrets.randbelow(MAX_SEED - self.limits.max_images)
        if solver == "dopri5":
            gr.Warning("dopri5 picks its own step sizes: the steps setting is not used")

        if self.class_conditional:
            label = self.class_index(condition)
            inputs = {"class_labels": [label] * num_images}
            subject = self.labels[label]
        else:
            prompt = "" if condition is None else str(condition).strip()
            if not prompt:
                raise gr.Error("type a prompt first")
            if negative_prompt is not None and not isinstance(negative_prompt, str):
                raise gr.Error(f"the negative prompt must be text, got {type(negative_prompt).__name__}")
            negative_prompt = (negative_prompt or "").strip()
            for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
                if len(text) > MAX_PROMPT_CHARS:
                    raise gr.Error(f"the {name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
            inputs = {"prompt": [prompt], "negative_prompt": [negative_prompt], "num_images_per_prompt": num_images}
            subject = prompt

        device = self.pipe.device
        generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(num_images)]
        with self._lock:
            start = time.perf_counter()
            try:
                images = self.pipe(**inputs, num_inference_steps=steps_per_stage, guidance_scale=guidance_scale,
                                   shift=shift, solver=solver, generator=generators, output_type="pil")
            except (ValueError, FloatingPointError) as e:  # the pipeline's checks (and NaN samples) name the value
                raise gr.Error(str(e)) from None
            seconds = time.perf_counter() - start

        gallery = [(image, f"seed {seed + i}") for i, image in enumerate(images)]
        size = f"{images[0].width}×{images[0].height}"
        steps_text = "adaptive steps" if solver == "dopri5" else "steps " + "/".join(map(str, steps_per_stage))
        shown = subject if len(subject) <= 80 else subject[:77] + "..."
        info = (f"*{_markdown_escape(shown)}*: generated {num_images} image{'s' if num_images > 1 else ''} "
                f"({size}) in **{seconds:.2f} s** "
                f"on {device.type} · {solver}, {steps_text} · guidance {guidance_scale:g} · shift {shift:g} · "
                f"seed {seed}")
        return gallery, info


def _markdown_escape(text: str) -> str:
    """A user's prompt shown verbatim in Markdown (no links, emphasis or HTML from it)."""
    return re.sub(r"([\\`*_{}\[\]()<>#+\-.!|~])", r"\\\1", text)


def build_demo(generator: DemoGenerator) -> gr.Blocks:
    """The page: conditioning and sampling controls on the left, the gallery and the time taken on the right."""
    pipe, limits = generator.pipe, generator.limits
    c2i = generator.class_conditional
    mode = f"class-to-image, {len(generator.labels)} classes" if c2i else "text-to-image"
    with gr.Blocks(title="PixelFlow", analytics_enabled=False) as demo:
        gr.Markdown(f"# PixelFlow\nPixel-space cascaded flow matching ([arXiv 2504.07963]"
                    f"(https://arxiv.org/abs/2504.07963)). Checkpoint `{generator.name}`: {mode}, "
                    f"{pipe.resolution}×{pipe.resolution} px, {generator.num_stages} stages, on {pipe.device.type}.")
        with gr.Row():
            with gr.Column(scale=2):
                if c2i:
                    choices = generator.class_choices()
                    default = DEFAULT_IMAGENET_CLASS if len(choices) > DEFAULT_IMAGENET_CLASS else 0
                    # Custom values reach generate(), which also takes a class name or number (class_index)
                    # and names the closest classes when nothing matches.
                    condition = gr.Dropdown(choices=choices, value=default, label="Class", filterable=True,
                                            allow_custom_value=True, info="type to search by name or number",
                                            elem_id="pf-class")
                    negative = gr.State("")
                else:
                    condition = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS,
                                           placeholder="a photo of a red fox in the snow", elem_id="pf-prompt")
                    negative = gr.Textbox(label="Negative prompt", lines=1, max_length=MAX_PROMPT_CHARS,
                                          elem_id="pf-negative")
                steps = gr.Textbox(value=str(min(DEFAULT_STEPS, limits.max_steps)), label="Steps per stage",
                                   info=f"one number, or {generator.num_stages} separated by commas; "
                                        f"1..{limits.max_steps} each", elem_id="pf-steps")
                with gr.Row():
                    guidance = gr.Slider(*GUIDANCE_RANGE, value=DEFAULT_GUIDANCE[c2i], step=0.1, label="Guidance",
                                         info="0 = none", elem_id="pf-guidance")
                    shift = gr.Slider(*SHIFT_RANGE, value=1.0, step=0.1, label="Shift", elem_id="pf-shift")
                with gr.Row():
                    solver = gr.Radio(list(SOLVERS), value="euler", label="Solver", elem_id="pf-solver")
                    seed = gr.Number(value=0, precision=0, label="Seed", info=f"{RANDOM_SEED} = random",
                                     minimum=RANDOM_SEED, maximum=MAX_SEED - limits.max_images, elem_id="pf-seed")
                if limits.max_images > 1:
                    num_images = gr.Slider(1, limits.max_images, value=min(4, limits.max_images), step=1,
                                           label="Number of images", elem_id="pf-num-images")
                else:  # a slider needs two ends: one image per request is a fixed number
                    num_images = gr.Number(value=1, precision=0, interactive=False, label="Number of images",
                                           elem_id="pf-num-images")
                run = gr.Button("Generate", variant="primary", elem_id="pf-generate")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Samples", columns=4, height="auto", format="png", object_fit="contain",
                                     elem_id="pf-gallery")
                info = gr.Markdown(elem_id="pf-info")
        run.click(generator.generate, inputs=[condition, negative, steps, guidance, shift, solver, seed, num_images],
                  outputs=[gallery, info], api_name="generate", concurrency_limit=1)
    demo.queue(max_size=limits.max_queue, default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Serve the page (blocks until the server stops)."""
    demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, css=CSS)
