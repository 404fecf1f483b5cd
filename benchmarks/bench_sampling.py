"""Time PixelFlow sampling: whole cascade runs and single forwards per stage, fast path and plain path.

    python benchmarks/bench_sampling.py --tiny                      # CPU, a few seconds: keeps this script working
    python benchmarks/bench_sampling.py                             # CUDA: XL class-to-image, random weights
    python benchmarks/bench_sampling.py --checkpoint DIR --batch-sizes 16 64 --compare-plain

Prints a table: seconds per image, images per second, TFLOP/s and share of peak (whole runs and per stage),
peak memory, and how far the fast path's images are from the plain path's for the same noise.
FLOPs are counted analytically (forward_flops): every matrix product at 2 FLOPs per multiply-add.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pixelflow import fast  # noqa: E402
from pixelflow.model import PixelFlowModel  # noqa: E402
from pixelflow.model.embeddings import SINUSOID_CHANNELS  # noqa: E402
from pixelflow.pipeline import PixelFlowPipeline, stage_guidance_weights  # noqa: E402
from pixelflow.scheduler import PixelFlowScheduler  # noqa: E402

# configs/pixelflow_xl_c2i.yaml model.params, repeated here so the benchmark needs no omegaconf.
XL_C2I_PARAMS = dict(in_channels=3, out_channels=3, num_attention_heads=16, attention_head_dim=72, depth=28,
                     num_classes=1000, patch_size=4, attention_bias=True)
TINY_C2I_PARAMS = dict(in_channels=3, out_channels=3, num_attention_heads=2, attention_head_dim=8, depth=2,
                       num_classes=10, patch_size=2, attention_bias=True)
H100_BF16_PEAK_TFLOPS = 791.0  # measured dense bf16 matmul rate of one H100 (the issue's figure)
NUM_STAGES = 4


# ---------------------------------------------------------------------------------------------- FLOPs
def forward_flops(model: PixelFlowModel, batch: int, height: int, width: int, text_len: int = 0) -> float:
    """Matrix-product FLOPs (2 per multiply-add) of one dense forward of `batch` images of height x width.

    Counts the patch embedding, the two scalar embedders, each block's adaLN, q/k/v/o projections, QK^T and
    PV, MLP (and cross-attention with text_len text tokens), and the output head. Elementwise work is left out.
    """
    D = model.hidden_size
    inner = model.num_attention_heads * model.attention_head_dim
    p, cin, cout = model.patch_size, model.in_channels, model.out_channels
    n = (height // p) * (width // p)
    tokens = batch * n
    flops = 2 * tokens * cin * p * p * D                                    # patch embedding
    flops += 2 * 2 * batch * (SINUSOID_CHANNELS * D + D * D)                # timestep and grid-side MLPs
    block = 2 * batch * D * 6 * D                                           # adaLN modulation
    block += 2 * tokens * D * 3 * inner + 2 * tokens * inner * D            # q, k, v, o projections
    block += 2 * 2 * batch * n * n * inner                                  # QK^T and PV
    block += 2 * 2 * tokens * D * 4 * D                                     # MLP D -> 4D -> D
    if model.cross_attention_dim is not None and text_len:
        kv = model.cross_attention_dim
        block += 2 * tokens * D * inner + 2 * tokens * inner * D            # q, o
        block += 2 * 2 * batch * text_len * kv * inner                      # k, v of the text
        block += 2 * 2 * batch * n * text_len * inner                       # QK^T and PV
    flops += len(model.transformer_blocks) * block
    flops += 2 * batch * D * 2 * D + 2 * tokens * D * p * p * cout          # output head
    return float(flops)


def stage_batches(batch: int, weights: Sequence[float]) -> list[int]:
    """Rows the network sees per stage: doubled where the stage is guided (weight != 1)."""
    return [2 * batch if w != 1.0 else batch for w in weights]


def sampling_flops(model: PixelFlowModel, batch: int, resolution: int, steps: Sequence[int],
                   weights: Sequence[float]) -> float:
    """FLOPs of a whole Euler cascade: steps[k] forwards per stage at that stage's size and batch."""
    S = len(weights)
    return sum(steps[k] * forward_flops(model, rows, resolution >> (S - 1 - k), resolution >> (S - 1 - k))
               for k, rows in enumerate(stage_batches(batch, weights)))


# ---------------------------------------------------------------------------------------------- setup
def build_model(params: dict, device: str | torch.device, seed: int = 0) -> PixelFlowModel:
    """A model with random weights, built on `device`. The layers a fresh model zeroes (adaLN, output head)
    get small random values too, so outputs and images are not trivially zero and comparisons mean something."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = PixelFlowModel(**params)
    with torch.no_grad():
        for block in model.transformer_blocks:
            torch.nn.init.normal_(block.norm1.linear.weight, std=0.02)
        for layer in (model.proj_out_1, model.proj_out_2):
            torch.nn.init.normal_(layer.weight, std=0.02)
    return model.eval()


def make_pipeline(model: PixelFlowModel, resolution: int) -> PixelFlowPipeline:
    return PixelFlowPipeline(model, PixelFlowScheduler(num_train_timesteps=1000, num_stages=NUM_STAGES),
                             resolution=resolution)


def load_checkpoint_pipeline(folder: str, device: str) -> PixelFlowPipeline:
    """A pretrained folder through the one loader (needs omegaconf)."""
    return PixelFlowPipeline.from_pretrained(folder, device=device)


@dataclass
class Inputs:
    """Labels and every noise draw of one sampling run, so two paths can be given the same noise."""
    labels: torch.Tensor
    latents: torch.Tensor
    stage_noise: list[torch.Tensor]


def make_inputs(pipe: PixelFlowPipeline, batch: int, resolution: int, seed: int = 0) -> Inputs:
    device = pipe.device
    gen = torch.Generator(device=device).manual_seed(seed)
    S = pipe.scheduler.num_stages
    labels = torch.randint(0, pipe.model.num_classes, (batch,), generator=gen, device=device)
    side = resolution >> (S - 1)
    latents = torch.randn(batch, 3, side, side, generator=gen, device=device)
    noise = [pipe.scheduler.sample_block_noise(batch, 3, side << k, side << k, generator=gen, device=device)
             for k in range(1, S)]
    return Inputs(labels, latents, noise)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(pipe: PixelFlowPipeline):
    dtype = pipe.autocast_dtype
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(pipe.device.type, dtype=dtype)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class RunResult:
    path: str
    batch: int
    steps: list[int]
    seconds: float
    flops: float
    peak_gib: float | None
    images: torch.Tensor | None = field(default=None, repr=False)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.batch


def sample(pipe: PixelFlowPipeline, inputs: Inputs, resolution: int, steps: Sequence[int], guidance: float):
    """One whole cascade run (Euler), images (B, H, W, 3) in [0, 1] on the device."""
    return pipe(class_labels=inputs.labels, height=resolution, width=resolution, num_inference_steps=list(steps),
                guidance_scale=guidance, latents=inputs.latents, stage_noise=inputs.stage_noise, output_type="pt")


def time_sampling(pipe: PixelFlowPipeline, path: str, inputs: Inputs, resolution: int, steps: Sequence[int],
                  guidance: float) -> RunResult:
    device = pipe.device
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    images = sample(pipe, inputs, resolution, steps, guidance)
    synchronize(device)
    seconds = time.perf_counter() - start
    batch = inputs.labels.shape[0]
    weights = stage_guidance_weights(guidance, pipe.scheduler.num_stages, pipe.class_conditional)
    return RunResult(path, batch, list(steps), seconds, sampling_flops(pipe.model, batch, resolution, steps, weights),
                     peak_gib(device), images)


def warm_up(pipe: PixelFlowPipeline, inputs: Inputs, resolution: int, guidance: float) -> float:
    """One step per stage: every stage's shape is compiled, captured and its attention kernel picked.
    Returns the seconds it took (compile time, for a compiled fast path)."""
    start = time.perf_counter()
    sample(pipe, inputs, resolution, [1] * pipe.scheduler.num_stages, guidance)
    synchronize(pipe.device)
    return time.perf_counter() - start


@dataclass
class ForwardResult:
    path: str
    stage: int
    resolution: int
    rows: int
    seconds: float
    flops: float
    kernel: str = ""


def time_forwards(pipe: PixelFlowPipeline, path: str, batch: int, resolution: int, guidance: float,
                  reps: int = 5, stages: Sequence[int] | None = None) -> list[ForwardResult]:
    """Median time of one network call (pipe.denoiser) per stage at the rows sampling gives it."""
    device, model = pipe.device, pipe.model
    S = pipe.scheduler.num_stages
    weights = stage_guidance_weights(guidance, S, pipe.class_conditional)
    gen = torch.Generator(device=device).manual_seed(1)
    results = []
    for stage in (range(S) if stages is None else stages):
        rows = stage_batches(batch, weights)[stage]
        side = resolution >> (S - 1 - stage)
        x = torch.randn(rows, 3, side, side, generator=gen, device=device)
        t = torch.full((rows,), float(pipe.scheduler.timesteps_per_stage[stage][500]), device=device)
        labels = torch.randint(0, model.num_classes, (rows,), generator=gen, device=device)
        if rows > batch:
            labels[batch:] = model.null_label

        def call():
            with torch.no_grad(), autocast(pipe):
                return pipe.denoiser(x, t, class_labels=labels)

        call()
        times = []
        for _ in range(reps):
            synchronize(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start_s = time.perf_counter()
                call()
                times.append(time.perf_counter() - start_s)
        kernel = ""
        if isinstance(pipe.denoiser, fast.FastDenoiser):
            kernel = pipe.denoiser.attention_choice.get((rows, (side // model.patch_size) ** 2),
                                                        pipe.denoiser.options.attention)
        results.append(ForwardResult(path, stage, side, rows, sorted(times)[len(times) // 2],
                                     forward_flops(model, rows, side, side), kernel))
    return results


def image_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far two image batches in [0, 1] are apart: in [0, 1] units and in uint8 levels."""
    a8, b8 = (a * 255).round(), (b * 255).round()
    return {"max_abs": (a - b).abs().max().item(), "mean_abs": (a - b).abs().mean().item(),
            "max_uint8": (a8 - b8).abs().max().item(), "mean_uint8": (a8 - b8).abs().mean().item(),
            "frac_uint8_differ": (a8 != b8).float().mean().item()}


# ---------------------------------------------------------------------------------------------- tables
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _tflops(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def runs_table(runs: Sequence[RunResult], peak_tflops: float | None) -> str:
    lines = ["| path | batch | steps/stage | s/run | s/image | images/s | TFLOP/s | % of peak | peak mem GiB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        tflops = r.flops / r.seconds / 1e12
        share = 100 * tflops / peak_tflops if peak_tflops else None
        lines.append(f"| {r.path} | {r.batch} | {'x'.join(map(str, r.steps))} | {r.seconds:.2f} | "
                     f"{r.seconds_per_image:.3f} | {r.batch / r.seconds:.2f} | {_tflops(tflops)} | "
                     f"{_fmt(share, '.0f')} | "
                     f"{_fmt(r.peak_gib, '.1f')} |")
    return "\n".join(lines)


def forwards_table(rows: Sequence[ForwardResult], peak_tflops: float | None) -> str:
    lines = ["| path | stage | px | rows | ms/forward | TFLOP/forward | TFLOP/s | % of peak | attention |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        tflops = r.flops / r.seconds / 1e12
        share = 100 * tflops / peak_tflops if peak_tflops else None
        lines.append(f"| {r.path} | {r.stage} | {r.resolution} | {r.rows} | {1e3 * r.seconds:.2f} | "
                     f"{r.flops / 1e12:.4g} | {_tflops(tflops)} | {_fmt(share, '.0f')} | {r.kernel or '-'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_fast_options(pairs: Sequence[str]) -> dict:
    """["compile=false", "attention=flash"] -> FastOptions keyword arguments."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--fast-option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        low = value.lower()
        out[key] = {"true": True, "false": False, "none": None}.get(low, int(value) if value.isdigit() else value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--tiny", action="store_true", help="a tiny model at 32 px on the CPU (or --device): seconds")
    p.add_argument("--checkpoint", default=None, help="pretrained folder to load instead of random XL weights")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--resolution", type=int, default=None, help="default: 256 (32 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps per stage (default: 30; 2 with --tiny)")
    p.add_argument("--guidance", type=float, default=2.4)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 16 64 (2 with --tiny)")
    p.add_argument("--compare-plain", action="store_true",
                   help="also time the plain path (at the first batch size) and compare its images")
    p.add_argument("--plain-steps", type=int, default=None, help="steps per stage of the plain run (default: --steps)")
    p.add_argument("--forward-reps", type=int, default=5)
    p.add_argument("--fast-option", nargs="*", default=[], metavar="KEY=VALUE",
                   help="FastOptions overrides, e.g. compile=false attention=flash cuda_graphs=false")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"for the %% of peak columns (default: {H100_BF16_PEAK_TFLOPS} on CUDA, none on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    resolution = args.resolution or (32 if args.tiny else 256)
    steps = args.steps or (2 if args.tiny else 30)
    batch_sizes = args.batch_sizes or ([2] if args.tiny else [16, 64])
    peak = args.peak_tflops or (H100_BF16_PEAK_TFLOPS if device.type == "cuda" else None)
    overrides = parse_fast_options(args.fast_option)
    if args.tiny and device.type == "cpu":  # exercise the fast path's CPU-capable switches
        overrides = {"merge_qkv": True, "merge_adaln": True, **overrides}
        torch.set_num_threads(1)  # tiny matmuls: threads only add noise to the timings

    if args.checkpoint:
        pipe = load_checkpoint_pipeline(args.checkpoint, str(device))
        name = args.checkpoint
    else:
        pipe = make_pipeline(build_model(TINY_C2I_PARAMS if args.tiny else XL_C2I_PARAMS, device, args.seed),
                             resolution)
        name = "tiny c2i" if args.tiny else "XL c2i (random weights)"
    n_params = sum(p.numel() for p in pipe.model.parameters())
    print(f"# PixelFlow sampling benchmark: {name}, {n_params:,} parameters, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    print(f"# {resolution} px, {NUM_STAGES} x {steps} Euler steps, guidance {args.guidance}, batch sizes {batch_sizes}")

    plain_dtype = torch.bfloat16 if device.type == "cuda" else None
    fast.accelerate(pipe, **overrides)
    print(f"# fast path: {pipe.denoiser.options if isinstance(pipe.denoiser, fast.FastDenoiser) else 'plain model'}"
          f", autocast {pipe.autocast_dtype}")
    runs, forwards, fast_images = [], [], {}
    for batch in batch_sizes:
        inputs = make_inputs(pipe, batch, resolution, args.seed)
        compile_s = warm_up(pipe, inputs, resolution, args.guidance)
        print(f"# fast path, batch {batch}: warm-up (compile, capture, attention pick) {compile_s:.1f} s")
        run = time_sampling(pipe, "fast", inputs, resolution, [steps] * NUM_STAGES, args.guidance)
        runs.append(run)
        fast_images[batch] = (inputs, run.images)
        forwards += time_forwards(pipe, "fast", batch, resolution, args.guidance, args.forward_reps)

    if args.compare_plain:
        fast_denoiser, fast_dtype = pipe.denoiser, pipe.autocast_dtype
        fast.plain(pipe)
        pipe.autocast_dtype = plain_dtype
        batch = batch_sizes[0]
        inputs, images = fast_images[batch]
        plain_steps = args.plain_steps or steps
        warm_up(pipe, inputs, resolution, args.guidance)
        run = time_sampling(pipe, "plain", inputs, resolution, [plain_steps] * NUM_STAGES, args.guidance)
        runs.append(run)
        forwards += time_forwards(pipe, "plain", batch, resolution, args.guidance, max(1, args.forward_reps // 2))
        if plain_steps != steps:  # same steps for the image comparison
            pipe.denoiser, pipe.autocast_dtype = fast_denoiser, fast_dtype
            images = sample(pipe, inputs, resolution, [plain_steps] * NUM_STAGES, args.guidance)
        diff = image_difference(images.float(), run.images.float())
        print(f"# fast vs plain images, batch {batch}, same noise: " +
              ", ".join(f"{k} {v:.4g}" for k, v in diff.items()))
        pipe.denoiser, pipe.autocast_dtype = fast_denoiser, fast_dtype

    print("\n## Whole sampling runs\n" + runs_table(runs, peak))
    print("\n## One forward per stage\n" + forwards_table(forwards, peak))
    plain_runs = [r for r in runs if r.path == "plain"]
    if plain_runs:
        fast_run = next(r for r in runs if r.path == "fast" and r.batch == plain_runs[0].batch)
        speedup = (plain_runs[0].seconds_per_image / sum(plain_runs[0].steps)) / \
                  (fast_run.seconds_per_image / sum(fast_run.steps))
        print(f"\nspeed-up of the fast path at batch {fast_run.batch} (per step): {speedup:.2f}x")


if __name__ == "__main__":
    main()
