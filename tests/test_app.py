"""The demo without a browser: the request handler's caps and messages, class lookup, the page's controls,
the command line, and a text-to-image checkpoint (tiny random T5, no download)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # app.py is a script at the repository root, not part of the package
    sys.path.insert(0, str(REPO))

import app  # noqa: E402
from pixelflow.checkpoint import build_model  # noqa: E402
from pixelflow.demo import DemoGenerator, DemoLimits, build_demo, load_demo_pipeline  # noqa: E402
from pixelflow.imagenet_classes import class_names  # noqa: E402

GOLDEN = REPO / "tests" / "golden"


@pytest.fixture(scope="module")
def c2i() -> DemoGenerator:
    return DemoGenerator(load_demo_pipeline(GOLDEN / "c2i_ckpt", device="cpu"), DemoLimits(max_images=3, max_steps=5))


@pytest.fixture(scope="module")
def t2i_ckpt(tmp_path_factory) -> Path:
    """The golden text-to-image weights with the tiny random T5 named in the config."""
    folder = tmp_path_factory.mktemp("t2i_ckpt")
    shutil.copy(GOLDEN / "t2i_ckpt" / "model.pt", folder / "model.pt")
    config = OmegaConf.load(GOLDEN / "t2i_ckpt" / "config.yaml")
    config.text_encoder = {"name": "tiny-random-t5", "max_length": 16}
    OmegaConf.save(config, folder / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def four_class_ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("c2i_4")
    config = OmegaConf.load(GOLDEN / "c2i_ckpt" / "config.yaml")
    config.model.params.num_classes = 4
    OmegaConf.save(config, folder / "config.yaml")
    torch.save(build_model(config).state_dict(), folder / "model.pt")
    return folder


def _dropdown(demo: gr.Blocks) -> gr.Dropdown:
    (dropdown,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown)]
    return dropdown


# ---------------------------------------------------------------------------- classes
def test_imagenet_names_come_from_timm():
    names = class_names(1000)
    assert len(names) == 1000 and len(set(names)) > 990
    assert names[0].startswith("tench") and names[207] == "golden retriever" and names[281] == "tabby, tabby cat"
    assert class_names(4) == ["class 0", "class 1", "class 2", "class 3"]


@pytest.mark.parametrize("query, label", [
    (207, 207), (207.0, 207), ("207", 207), ("207: golden retriever", 207), ("golden retriever", 207),
    ("Tabby Cat", 281), ("  tabby  ", 281), ("class 3", 3), (0, 0), (999, 999), (np.int64(5), 5),
])
def test_class_lookup(c2i, query, label):
    assert c2i.class_index(query) == label


@pytest.mark.parametrize("query, message", [
    (1000, "class 1000 is outside 0..999"), (-1, "outside 0..999"), ("crane", "ambiguous (134: crane; 517: crane)"),
    ("golden retrievr", "did you mean 'golden retriever'"), ("zzzz", "no class named 'zzzz'"), (None, "pick a class"), ("  ", "pick a class"),
])
def test_class_lookup_errors(c2i, query, message):
    with pytest.raises(gr.Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        c2i.class_index(query)


def test_small_checkpoint_offers_only_its_classes(four_class_ckpt):
    generator = DemoGenerator(load_demo_pipeline(four_class_ckpt, device="cpu", class_cond=True))
    assert generator.class_choices() == [(f"class {i}", i) for i in range(4)]
    dropdown = _dropdown(build_demo(generator))
    assert [value for _, value in dropdown.choices] == [0, 1, 2, 3] and dropdown.value == 0
    with pytest.raises(gr.Error, match="this checkpoint has 4 classes"):
        generator.class_index(4)
    gallery, _ = generator.generate("class 2", steps=1, num_images=1)
    assert gallery[0][0].size == (32, 32)


# ---------------------------------------------------------------------------- generate
def test_generate_class_to_image(c2i):
    gallery, info = c2i.generate("tabby", "", "1, 1, 2, 1", 2.4, 1.0, "euler", 7, 2)
    assert [caption for _, caption in gallery] == ["seed 7", "seed 8"]
    assert all(image.size == (32, 32) and image.mode == "RGB" for image, _ in gallery)
    assert info.startswith("*tabby, tabby cat*: generated 2 images (32×32) in **")
    assert "steps 1/1/2/1" in info and "seed 7" in info and " s** on cpu" in info
    # Image i depends on seed + i only: asking for fewer images does not change the first one.
    alone, _ = c2i.generate(281, "", 1, 2.4, 1.0, "euler", 8, 1)
    again, _ = c2i.generate(281, "", 1, 2.4, 1.0, "euler", 7, 2)
    assert np.array_equal(np.asarray(alone[0][0]), np.asarray(again[1][0]))


def test_random_seed_is_reported(c2i):
    _, info = c2i.generate(1, steps=1, seed=-1, num_images=1)
    assert "seed -1" not in info and "seed " in info


@pytest.mark.parametrize("change, message", [
    ({"steps": 6}, r"between 1 and 5 \(this demo's cap\), got 6"),
    ({"steps": 0}, "between 1 and 5"),
    ({"steps": "1,2"}, r"one step count \(used at every stage\) or one per stage \(4 stages\), got 2 values"),
    ({"steps": "a lot"}, "one whole number or 4 of them"),
    ({"steps": "1.5"}, "whole numbers"),
    ({"steps": ""}, "one step count for every stage"),
    ({"num_images": 4}, r"number of images must be between 1 and 3 \(this demo's cap\), got 4"),
    ({"num_images": 0}, "number of images must be between 1 and 3"),
    ({"num_images": 1.5}, "number of images must be a whole number"),
    ({"guidance_scale": -0.5}, "guidance must be between 0 and 20, got -0.5"),
    ({"guidance_scale": float("nan")}, "guidance must be between 0 and 20"),
    ({"shift": 0}, "shift must be between 0.1 and 10"),
    ({"solver": "rk4"}, "solver must be one of euler, dopri5, got 'rk4'"),
    ({"seed": -2}, "seed must be between -1 and"),
    ({"seed": 2**40}, "seed must be between -1 and"),
    ({"seed": "abc"}, "seed must be a number"),
])
def test_caps_and_bad_values_are_clear_errors(c2i, change, message):
    request = dict(condition=207, steps=1, guidance_scale=2.4, shift=1.0, solver="euler", seed=0, num_images=1)
    request.update(change)
    with pytest.raises(gr.Error, match=message):
        c2i.generate(**request)


def test_the_caps_themselves_are_allowed(c2i):
    cap = c2i.limits.max_steps
    assert c2i.parse_steps(cap) == [cap] * 4 and c2i.parse_steps(f"1, 1, 1, {cap}") == [1, 1, 1, cap]
    with pytest.raises(gr.Error, match="seed must be between -1 and"):  # seed + i must stay a 31-bit seed
        c2i.generate(207, steps=1, seed=2**31 - c2i.limits.max_images, num_images=1)


class RecordingPipeline:
    """Stands in for the pipeline: records each call's generators' seeds, returns blank images."""
    class_conditional, device = True, torch.device("cpu")

    def __init__(self):
        self.seeds = []

    def __call__(self, **kwargs):
        self.seeds.append([g.initial_seed() for g in kwargs["generator"]])
        return [Image.new("RGB", (32, 32))] * len(kwargs["generator"])


def test_random_seeds_differ_between_requests(c2i, monkeypatch):
    pipe = RecordingPipeline()
    monkeypatch.setattr(c2i, "pipe", pipe)
    for _ in range(3):
        c2i.generate(3, steps=1, seed=-1, num_images=2)
    assert len({seeds[0] for seeds in pipe.seeds}) == 3  # 3 draws from 2^31 seeds: equal ones would be a bug
    assert all(seeds[1] == seeds[0] + 1 and 0 <= seeds[0] <= 2**31 - 1 - c2i.limits.max_images
               for seeds in pipe.seeds)


def test_queue_size_is_the_demo_s_cap(c2i):
    demo = build_demo(DemoGenerator(c2i.pipe, DemoLimits(max_images=3, max_steps=5, max_queue=2)))
    assert demo._queue.max_size == 2


def test_dopri5_warns_that_steps_are_unused(c2i, monkeypatch):
    # The pipeline's dopri5 is checked against the release elsewhere; here only what the demo passes it.
    calls = []

    class FakePipeline:
        class_conditional, device = True, torch.device("cpu")

        def __call__(self, **kwargs):
            calls.append(kwargs)
            return [Image.new("RGB", (32, 32))] * len(kwargs["generator"])

    monkeypatch.setattr(c2i, "pipe", FakePipeline())
    with pytest.warns(UserWarning, match="dopri5 picks its own step sizes"):
        gallery, info = c2i.generate(3, steps=1, solver="dopri5", num_images=2)
    assert "dopri5, adaptive steps" in info and len(gallery) == 2
    assert calls[0]["solver"] == "dopri5" and calls[0]["class_labels"] == [3, 3]


def test_page_controls_and_queue(c2i):
    demo = build_demo(c2i)
    dropdown = _dropdown(demo)
    assert len(dropdown.choices) == 1000 and dropdown.value == 207 and dropdown.filterable
    assert demo._queue.max_size == c2i.limits.max_queue
    (event,) = [fn for fn in demo.fns.values() if fn.api_name == "generate"]
    assert event.concurrency_limit == 1  # one sampling call at a time: the scheduler keeps per-call state
    (slider,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "pf-num-images"]
    assert slider.maximum == c2i.limits.max_images


# ---------------------------------------------------------------------------- text-to-image
def test_text_to_image(t2i_ckpt):
    generator = DemoGenerator(load_demo_pipeline(t2i_ckpt, device="cpu"))
    assert not generator.class_conditional and generator.class_choices() == []
    gallery, info = generator.generate("a red fox [in](snow)", "blurry", 1, 4.0, 1.0, "euler", 0, 2)
    assert len(gallery) == 2 and gallery[0][0].size == (32, 32)
    assert info.startswith(r"*a red fox \[in\]\(snow\)*: generated 2 images")
    with pytest.raises(gr.Error, match="type a prompt"):
        generator.generate("   ", steps=1)
    with pytest.raises(gr.Error, match="limit is 2000"):
        generator.generate("x" * 2001, steps=1)
    demo = build_demo(generator)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"pf-prompt", "pf-negative"} <= ids and "pf-class" not in ids


def test_text_to_image_negative_prompt_reaches_the_sampler(t2i_ckpt):
    generator = DemoGenerator(load_demo_pipeline(t2i_ckpt, device="cpu"))
    [(plain, _)], _ = generator.generate("a red fox", "", 1, 4.0, 1.0, "euler", 0, 1)
    [(negative, _)], _ = generator.generate("a red fox", "blurry, dark", 1, 4.0, 1.0, "euler", 0, 1)
    assert not np.array_equal(np.asarray(plain), np.asarray(negative))


def test_class_cond_flag_must_match_checkpoint(t2i_ckpt, capsys):
    with pytest.raises(ValueError, match="--class_cond was given but .* is a text-to-image checkpoint"):
        load_demo_pipeline(t2i_ckpt, device="cpu", class_cond=True)
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--checkpoint", str(t2i_ckpt), "--class_cond"])
    assert exit_info.value.code == 2 and "drop --class_cond" in capsys.readouterr().err


def test_loading_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        load_demo_pipeline(tmp_path / "missing", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available; use --device cpu"):
        load_demo_pipeline(GOLDEN / "c2i_ckpt", device="cuda")


# ---------------------------------------------------------------------------- command line
def test_cli_defaults_match_the_demo():
    args = app.build_parser().parse_args(["--checkpoint", "x"])
    assert (args.host, args.port, args.share, args.class_cond, args.device) == ("127.0.0.1", 7860, False, False, None)
    assert DemoLimits(args.max_images, args.max_steps, args.max_queue) == DemoLimits()


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["--checkpoint", "x", "--classcond"], "unrecognized arguments: --classcond"),
    (["--checkpoint", "x", "--max-images", "0"], "--max-images: must be >= 1"),
    (["--checkpoint", "x", "--port", "70000"], "--port: must be a TCP port in 0..65535, got 70000"),
    (["--checkpoint", "x", "--max-steps", "x"], "--max-steps: expected an int >= 1, got 'x'"),
    (["--checkpoint", "x", "--port", "y"], "--port: expected a TCP port in 0..65535, got 'y'"),
    ([], "the following arguments are required: --checkpoint"),
])
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_script_rejects_unknown_flag_before_loading_anything():
    result = subprocess.run([sys.executable, str(REPO / "app.py"), "--checkpoint", "x", "--bogus"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr


def test_cli_names_a_port_it_cannot_serve_on(monkeypatch):
    import pixelflow.demo as demo

    def busy(*args, **kwargs):
        raise OSError("[Errno 98] Address already in use")

    monkeypatch.setattr(demo, "launch", busy)
    with pytest.raises(SystemExit, match=r"cannot serve on --host 127.0.0.1 --port 7861: .*already in use"):
        app.main(["--checkpoint", str(REPO / "tests" / "golden" / "c2i_ckpt"), "--port", "7861"])


def test_the_page_is_served_on_this_machine_only_unless_asked(monkeypatch):
    import pixelflow.demo as demo
    served = []

    class Page:
        def launch(self, **kwargs):
            served.append(kwargs)

    demo.launch(Page())
    assert served[-1]["server_name"] == "127.0.0.1" and served[-1]["share"] is False
    monkeypatch.setattr(demo, "launch", lambda page, **kwargs: served.append(kwargs))
    app.main(["--checkpoint", str(GOLDEN / "c2i_ckpt"), "--no-fast", "--device", "cpu", "--host", "0.0.0.0",
              "--port", "7999", "--share"])
    assert served[-1] == {"host": "0.0.0.0", "port": 7999, "share": True}


def test_one_image_per_request_and_a_bad_device_name(c2i):
    """--max-images 1 builds a page (a slider cannot have equal ends); --device foo is a clear error."""
    pipe = c2i.pipe
    demo = build_demo(DemoGenerator(pipe, DemoLimits(max_images=1, max_steps=5)))
    (control,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "pf-num-images"]
    assert control.value == 1 and not control.interactive
    with pytest.raises(ValueError, match="--device 'foo' is not a device"):
        load_demo_pipeline(GOLDEN / "c2i_ckpt", device="foo")


def test_app_caps_default_to_the_demo_s_own():
    # app.py writes the caps' defaults out (its --help must not import gradio); they must stay the demo's.
    import app

    from pixelflow import demo
    args = app.build_parser().parse_args(["--checkpoint", "x"])
    assert (args.max_images, args.max_steps, args.max_queue) == (
        demo.DEFAULT_MAX_IMAGES, demo.DEFAULT_MAX_STEPS, demo.DEFAULT_MAX_QUEUE)
