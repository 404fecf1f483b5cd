"""Sample N images from a PixelFlow checkpoint into D/NNNNNN.png and D.npz (arr_0, uint8 (N, H, W, 3)) for FID.

    torchrun --nproc_per_node=8 sample_ddp.py --pretrained DIR [--cfg 2.4] [--use-ode-dopri5] ...
    python sample_ddp.py --pretrained DIR --device cpu ...

Image i gets class i mod num_classes (or prompt i mod len(prompts)) and noise seeded from (global seed, i).
Re-running the same command resumes. The work is done by pixelflow.sampling; this file only parses flags.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pixelflow.checkpoint import FolderError, WeightsError
from pixelflow.distributed import cleanup, init_distributed, resolve_device
from pixelflow.sampling import (BARRIER_TIMEOUT, GUIDANCE_SCHEDULES, SampleOptions, plan_on_every_rank,
                               sample_to_folder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Reproducibility: an image depends on its index and the settings, never on the number of processes, "
               "and re-running a killed command gives exactly the uninterrupted result. With Euler, the batch size "
               "does not matter on the CPU; on CUDA another --local-batch-size can move a few pixels by one 8-bit "
               "level. With --use-ode-dopri5 the adaptive step size is shared by a batch, so images depend on "
               "--local-batch-size (it is then part of the folder's settings).",
        allow_abbrev=False)
    parser.add_argument("--pretrained", required=True,
                        help="checkpoint folder (config.yaml + model.pt), or a training output folder (its newest "
                             "checkpoint is used)")
    parser.add_argument("--sample-dir", default=None,
                        help="folder for the PNGs; the .npz goes beside it as <folder>.npz (default: samples/"
                             "<checkpoint>-cfg<cfg>[const]-<steps<n> | steps<n_n_n_n> | dopri5>[-shift<s>]"
                             "[-<prompts file>]-seed<seed>, where a training checkpoint is <run>-<step>)")
    parser.add_argument("--cfg", type=float, default=2.4,
                        help="guidance scale g >= 0 (class-to-image ramps it over the stages; 0 = none; default: %(default)s)")
    parser.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="ramp",
                        help="ramp: the release's stage-wise weights 1 + (g-1)(0, 1/6, 2/3, 1) for class-to-image "
                             "with 4 stages (the FID 1.98 setting; other stage counts S: 1 + (g-1) k/(S-1), "
                             "k = 0..S-1; 1 stage: g); constant: g at every stage (the paper's Euler 2.51 setting "
                             "with g = 1.5). Text-to-image always uses g at every stage. (default: %(default)s)")
    parser.add_argument("--num-steps-per-stage", type=int, nargs="+", default=[30], metavar="N",
                        help="Euler steps: one int for every stage, or one per stage, e.g. 10 10 20 30 (default: 30)")
    parser.add_argument("--use-ode-dopri5", action="store_true",
                        help="adaptive dopri5 instead of Euler (the paper's FID setting); images then depend on "
                             "--local-batch-size because a batch shares its step size")
    parser.add_argument("--shift", type=float, default=1.0, help="time shift of the Euler grid, > 0 (default: %(default)s)")
    parser.add_argument("--local-batch-size", type=int, default=16, help="images per batch per process (default: %(default)s)")
    parser.add_argument("--num-fid-samples", type=int, default=50_000, help="number of images N (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="must equal the model's num_classes (default: the model's; 1000 for the release)")
    parser.add_argument("--global-seed", type=int, default=10, help="image i's noise is seeded from (seed, i) (default: %(default)s)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="network precision (default: bf16 autocast on CUDA, fp32 on the CPU)")
    parser.add_argument("--device", default=None,
                        help="e.g. cpu or cuda (default: cuda:LOCAL_RANK if CUDA is available, else cpu)")
    parser.add_argument("--prompts", default=None,
                        help="text-to-image only: a UTF-8 file with one prompt per line (blank lines skipped); "
                             "image i uses prompt i mod count")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("--no-fast", dest="fast", action="store_false",
                        help="sample with the plain model instead of the fast path (pixelflow.fast; CUDA only)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    options = SampleOptions(**vars(parser.parse_args(argv)))
    try:
        device = resolve_device(options.device)
    except ValueError as e:
        parser.error(str(e))
    # Join the process group first, then check the options in every process: when one process rejects them
    # (a checkpoint one node lacks), all stop at once instead of the others waiting for it, on other nodes
    # for the whole barrier timeout.
    ctx = init_distributed(device, timeout=BARRIER_TIMEOUT)
    try:
        try:
            plan = plan_on_every_rank(options, ctx)
        except ValueError as e:
            parser.error(str(e))
        try:
            sample_to_folder(plan, ctx)
        except (WeightsError, FolderError, FloatingPointError) as e:  # bad weights or folder, NaN images: the reason
            sys.exit(f"{parser.prog}: error: {e}")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
