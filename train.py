"""Train PixelFlow: `python train.py CONFIG [--output-dir DIR] [--resume] [key=value ...]`, or under torchrun.

Examples:
  python train.py configs/tiny_c2i.yaml --output-dir runs/tiny
  torchrun --nproc_per_node=8 train.py configs/pixelflow_xl_c2i.yaml --output-dir runs/xl data.root=/data/imagenet/train
"""

import argparse
import sys

from pixelflow.config import load_config
from pixelflow.training import TrainingStopped, TrainOptions, train


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a PixelFlow model (class- or text-to-image).",
                                     allow_abbrev=False)
    parser.add_argument("config", help="YAML config, e.g. configs/tiny_c2i.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config entries, e.g. train.max_steps=200 data.root=/data")
    parser.add_argument("--output-dir", default="./exp0001", help="run folder: checkpoints/, samples/, metrics.jsonl")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--logging-steps", type=int, default=10,
                        help="log loss and throughput every N steps to log.txt and metrics.jsonl (default: %(default)s)")
    parser.add_argument("--checkpoint-steps", type=int, default=1000,
                        help="write a checkpoint every N steps (default: %(default)s)")
    parser.add_argument("--pretrained-model", default=None,
                        help="start from these weights: a model.pt / .safetensors or a pretrained folder")
    parser.add_argument("--report-to", default=None, choices=["tensorboard", "wandb", "none"],
                        help="also log to tensorboard or wandb")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar; the loss rows then go to the console too (always to log.txt)")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        options = TrainOptions(output_dir=args.output_dir, resume=args.resume, logging_steps=args.logging_steps,
                               checkpoint_steps=args.checkpoint_steps, pretrained_model=args.pretrained_model,
                               report_to=None if args.report_to == "none" else args.report_to,
                               progress=not args.no_progress)
        train(config, options)
    except ValueError as e:
        _say(f"train.py: error: {e}")
        sys.exit(1)
    except TrainingStopped as e:  # diverged, interrupted or out of disk: the reason and what to do, no traceback
        _say(f"train.py: {e}")
        sys.exit(e.exit_code)


def _say(line: str) -> None:
    """One write per line: the processes of a job share stderr, and separate writes interleave mid-line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    main()
