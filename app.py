"""The PixelFlow Gradio demo.

    python app.py --checkpoint DIR [--class_cond] [--host 127.0.0.1] [--port 7860]

DIR is a pretrained folder (config.yaml + model.pt) or a training run's output folder (its newest checkpoint).
Its config decides class- or text-to-image; the page, the caps and the sampling live in pixelflow/demo.py.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port in 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 0..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PixelFlow Gradio demo", allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="pretrained folder (config.yaml + model.pt) or a run's output folder")
    p.add_argument("--class_cond", action="store_true",
                   help="accepted for the release's command line; the checkpoint's config decides, and this "
                        "flag must agree with it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port, default=7860, help="port to serve on (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available); bf16 autocast on cuda")
    # The caps' defaults are pixelflow.demo's DEFAULT_MAX_*, written out so that --help does not import gradio.
    p.add_argument("--max-images", type=positive_int, default=8, help="cap on images per request (default: %(default)s)")
    p.add_argument("--max-steps", type=positive_int, default=100,
                   help="cap on Euler steps per stage (default: %(default)s)")
    p.add_argument("--max-queue", type=positive_int, default=16,
                   help="requests that may wait in the queue (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--no-fast", dest="fast", action="store_false",
                   help="run the plain model instead of the fast path (pixelflow.fast; CUDA only)")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pixelflow.demo import DemoGenerator, DemoLimits, build_demo, launch, load_demo_pipeline

    try:
        pipe = load_demo_pipeline(args.checkpoint, device=args.device, class_cond=args.class_cond,
                                  fast=args.fast)
    except ValueError as e:
        parser.error(str(e))
    limits = DemoLimits(max_images=args.max_images, max_steps=args.max_steps, max_queue=args.max_queue)
    demo = build_demo(DemoGenerator(pipe, limits, name=args.checkpoint))
    try:
        launch(demo, host=args.host, port=args.port, share=args.share)
    except OSError as e:  # the port is taken, the host is not this machine's, or the share link failed
        where = f"--host {args.host} --port {args.port}" + (" with --share" if args.share else "")
        raise SystemExit(f"{parser.prog}: error: cannot serve on {where}: {e}") from None


if __name__ == "__main__":
    main()
