"""The cascade sampler on the golden tiny checkpoints: seeds, per-image generators, output types, guidance
batching, text conditioning with its padding mask, and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixelflow.pipeline import stage_guidance_weights, steps_per_stage

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

SIZE = 32
STEPS = 2


def sample(pipe, seed: int = 0, **kwargs):
    """A small class-to-image run; kwargs override the defaults."""
    args = dict(class_labels=[3, 7], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=2.4,
                generator=torch.Generator().manual_seed(seed), output_type="pt")
    args.update(kwargs)
    return pipe(**args)


def text_sample(pipe, seed: int = 0, **kwargs):
    args = dict(prompt=["a red fox", "blue"], height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=3.0, generator=torch.Generator().manual_seed(seed), output_type="pt")
    args.update(kwargs)
    return pipe(**args)


# ---------------------------------------------------------------------------------------------- seeds
def test_same_seed_same_images_other_seed_other_images(c2i_pipe):
    first, again, other = sample(c2i_pipe, seed=1), sample(c2i_pipe, seed=1), sample(c2i_pipe, seed=2)
    assert torch.equal(first, again)
    assert (first - other).abs().max().item() > 0.1


def test_per_image_generators_make_each_image_independent_of_the_batch(c2i_pipe, generators):
    # Euler with guidance: image 1 (label 7, seed 2) must not depend on what else is in the batch.
    pair = sample(c2i_pipe, class_labels=[3, 7], generator=generators(1, 2))
    other_pair = sample(c2i_pipe, class_labels=[5, 7], generator=generators(3, 2))
    alone = sample(c2i_pipe, class_labels=[7], generator=generators(2))
    assert (pair[1] - other_pair[1]).abs().max().item() < 1e-5
    assert (pair[1] - alone[0]).abs().max().item() < 1e-5
    assert (pair[0] - other_pair[0]).abs().max().item() > 0.1


# ---------------------------------------------------------------------------------------------- outputs
def test_output_types(c2i_pipe):
    as_tensor = sample(c2i_pipe, output_type="pt")
    as_array = sample(c2i_pipe, output_type="np")
    as_uint8 = sample(c2i_pipe, output_type="uint8")
    as_pil = sample(c2i_pipe, output_type="pil")

    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (2, SIZE, SIZE, 3)
    assert isinstance(as_array, np.ndarray) and as_array.shape == (2, SIZE, SIZE, 3)
    assert as_array.flags["C_CONTIGUOUS"] and as_tensor.is_contiguous()  # not a permuted view of (B, 3, H, W)
    assert as_array.dtype == np.float32
    assert as_array.min() >= 0.0 and as_array.max() <= 1.0 and as_array.std() > 0.05
    assert np.array_equal(as_array, as_tensor.numpy())

    assert isinstance(as_uint8, np.ndarray) and as_uint8.dtype == np.uint8 and as_uint8.shape == (2, SIZE, SIZE, 3)
    assert np.array_equal(as_uint8, np.round(as_array * np.float32(255)).astype(np.uint8))  # round(255 x)

    assert isinstance(as_pil, list) and len(as_pil) == 2
    for image, pixels in zip(as_pil, as_uint8):
        assert isinstance(image, Image.Image) and image.size == (SIZE, SIZE) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), pixels)


# ---------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("g", [1.5, 2.4, 4.0])
def test_stage_guidance_weights(g):
    assert stage_guidance_weights(g, 4, class_conditional=True) == pytest.approx(
        [1.0, 1 + (g - 1) / 6, 1 + (g - 1) * 2 / 3, g], abs=1e-12)
    assert stage_guidance_weights(g, 4, class_conditional=False) == pytest.approx([g] * 4, abs=1e-12)


def test_stage_guidance_ramp_for_other_stage_counts():
    # Outside the release's 4 stages kappa rises linearly from 0 (coarsest) to 1 (finest).
    assert stage_guidance_weights(3.0, 3, class_conditional=True) == pytest.approx([1.0, 2.0, 3.0], abs=1e-12)
    assert stage_guidance_weights(3.0, 2, class_conditional=True) == pytest.approx([1.0, 3.0], abs=1e-12)
    assert stage_guidance_weights(3.0, 1, class_conditional=True) == pytest.approx([3.0], abs=1e-12)


def test_explicit_guidance_weights_reproduce_the_stage_ramp(c2i_pipe):
    ramp = stage_guidance_weights(2.4, 4, class_conditional=True)
    assert torch.equal(sample(c2i_pipe, guidance_scale=2.4), sample(c2i_pipe, guidance_weights=ramp))


class CallRecorder:
    """Wraps pipe.denoiser and records (batch size, image side) of every network call."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls: list[tuple[int, int]] = []

    def __call__(self, x, timestep, **kwargs):
        self.calls.append((x.shape[0], x.shape[-1]))
        return self.denoiser(x, timestep, **kwargs)

    def batch_sizes_per_side(self) -> dict[int, set[int]]:
        sizes: dict[int, set[int]] = {}
        for batch, side in self.calls:
            sizes.setdefault(side, set()).add(batch)
        return sizes


STAGE_SIDES = (4, 8, 16, 32)  # 32 px output, 4 stages


@pytest.mark.parametrize("g, doubled_stages", [(1.0, ()), (0.0, ()), (2.4, (1, 2, 3))])
def test_class_guidance_doubles_the_batch_only_where_the_weight_is_not_one(c2i_pipe, monkeypatch, g,
                                                                           doubled_stages):
    recorder = CallRecorder(c2i_pipe.denoiser)
    monkeypatch.setattr(c2i_pipe, "denoiser", recorder)
    sample(c2i_pipe, guidance_scale=g, num_inference_steps=[2, 1, 1, 2])
    assert len(recorder.calls) == 6
    expected = {side: {4 if stage in doubled_stages else 2} for stage, side in enumerate(STAGE_SIDES)}
    assert recorder.batch_sizes_per_side() == expected


@pytest.mark.parametrize("g, doubled", [(1.0, False), (3.0, True)])
def test_text_guidance_doubles_the_batch_at_every_stage_or_none(t2i_pipe, monkeypatch, g, doubled):
    recorder = CallRecorder(t2i_pipe.denoiser)
    monkeypatch.setattr(t2i_pipe, "denoiser", recorder)
    text_sample(t2i_pipe, guidance_scale=g, num_inference_steps=1)
    assert recorder.batch_sizes_per_side() == {side: {4 if doubled else 2} for side in STAGE_SIDES}


# ---------------------------------------------------------------------------------------------- text
def test_text_to_image_is_reproducible(t2i_pipe):
    first, again = text_sample(t2i_pipe, seed=4), text_sample(t2i_pipe, seed=4)
    assert first.shape == (2, SIZE, SIZE, 3)
    assert torch.equal(first, again)
    assert (first - text_sample(t2i_pipe, seed=5)).abs().max().item() > 0.1


def test_negative_prompt_takes_the_place_of_the_empty_prompt_in_guidance(t2i_pipe):
    default = text_sample(t2i_pipe, seed=4)
    assert torch.equal(default, text_sample(t2i_pipe, seed=4, negative_prompt=""))
    negative = text_sample(t2i_pipe, seed=4, negative_prompt=["blurry, dark", ""])
    assert (negative[0] - default[0]).abs().max().item() > 1e-3  # guided away from "blurry, dark"
    assert (negative[1] - default[1]).abs().max().item() < 1e-6  # its own negative prompt is the empty one


def test_text_padding_is_masked_out(t2i_pipe, monkeypatch):
    short_length, long_length = t2i_pipe.max_text_length, 40
    short = text_sample(t2i_pipe)
    monkeypatch.setattr(t2i_pipe, "max_text_length", long_length)
    padded = text_sample(t2i_pipe)
    assert (short - padded).abs().max().item() < 1e-5

    # Control: the same two token budgets differ once the mask is dropped, so padding would leak.
    model_call = t2i_pipe.denoiser

    def without_mask(x, timestep, **kwargs):
        kwargs.pop("encoder_attention_mask", None)
        return model_call(x, timestep, **kwargs)

    monkeypatch.setattr(t2i_pipe, "denoiser", without_mask)
    unmasked_padded = text_sample(t2i_pipe)
    monkeypatch.setattr(t2i_pipe, "max_text_length", short_length)
    unmasked_short = text_sample(t2i_pipe)
    assert (unmasked_padded - unmasked_short).abs().max().item() > 1e-2


# ---------------------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(height=24), r"height=24.*16", id="height-not-multiple-of-16"),
    pytest.param(dict(width=40), r"width=40.*16", id="width-not-multiple-of-16"),
    pytest.param(dict(class_labels=[3, 1000]), r"1000.*\[0, 1000\)", id="label-1000"),
    pytest.param(dict(class_labels=[-1]), r"-1.*\[0, 1000\)", id="label-minus-1"),
    pytest.param(dict(num_inference_steps=0), r"num_inference_steps.*\b0\b", id="zero-steps"),
    pytest.param(dict(num_inference_steps=[3, 3, -2, 3]), r"num_inference_steps.*-2", id="negative-stage-steps"),
    pytest.param(dict(num_inference_steps=[3, 3]), r"4.*\[3, 3\]", id="two-stage-steps-for-4-stages"),
    pytest.param(dict(guidance_scale=-0.5), r"guidance_scale.*-0\.5", id="negative-guidance"),
    pytest.param(dict(solver="rk4"), r"'rk4'", id="unknown-solver"),
    pytest.param(dict(output_type="jpeg"), r"'jpeg'", id="unknown-output-type"),
])
def test_bad_input_is_rejected_by_name(c2i_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(c2i_pipe, **kwargs)


def noise_for(batch: int, rows: int | None = None, last_side: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    sides = (8, 16, last_side)
    return [torch.randn(rows or batch, 3, s, s, generator=gen) for s in sides]


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(stage_noise=noise_for(2, last_side=31)), r"stage_noise\[2\] \(stage 3\).*\(2, 3, 32, 32\)"
                 r".*\(2, 3, 31, 31\)", id="last-stage-noise-shape"),
    pytest.param(dict(stage_noise=noise_for(2, rows=1)), r"stage_noise\[0\].*\(1, 3, 8, 8\)", id="noise-rows"),
    pytest.param(dict(stage_noise=torch.zeros(2, 3, 8, 8)), r"list of 3 tensors.*Tensor", id="noise-not-a-list"),
    pytest.param(dict(height="32"), r"height='32'", id="height-string"),
    pytest.param(dict(guidance_scale="2"), r"guidance_scale must be a number, got '2'", id="guidance-string"),
    pytest.param(dict(shift="1"), r"shift must be a number, got '1'", id="shift-string"),
    pytest.param(dict(generator=42), r"generator must be a torch.Generator.*42", id="generator-int"),
    pytest.param(dict(latents=[[0.0]]), r"latents must be a tensor.*list", id="latents-list"),
    pytest.param(dict(num_inference_steps=True), r"num_inference_steps.*True", id="steps-bool"),
    pytest.param(dict(class_labels=["golden retriever"]), r"class_labels must be integers.*golden retriever",
                 id="label-name"),
    pytest.param(dict(guidance_weights=[1, 2, float("nan"), 4]), r"guidance_weights must be finite.*nan",
                 id="guidance-weights-nan"),
    pytest.param(dict(num_images_per_prompt=0), r"num_images_per_prompt must be an int >= 1, got 0",
                 id="zero-images-per-prompt"),
])
def test_bad_input_is_rejected_before_any_network_call(c2i_pipe, monkeypatch, kwargs, message):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was called before the inputs were checked")

    monkeypatch.setattr(c2i_pipe, "denoiser", no_network)
    with pytest.raises(ValueError, match=message):
        sample(c2i_pipe, **kwargs)


def test_steps_may_be_an_integer_tensor(c2i_pipe):
    expected = sample(c2i_pipe, num_inference_steps=[1, 2, 1, 2])
    assert torch.equal(sample(c2i_pipe, num_inference_steps=torch.tensor([1, 2, 1, 2])), expected)


def test_one_step_count_serves_every_stage_in_any_form(c2i_pipe):
    """The pipeline, sample_ddp and the demo share steps_per_stage: one count is used at every stage."""
    assert steps_per_stage([2], 4) == [2, 2, 2, 2] and steps_per_stage((1, 2, 3), 3, "x") == [1, 2, 3]
    expected = sample(c2i_pipe, num_inference_steps=[2, 2, 2, 2])
    for steps in (2, [2], np.int64(2), torch.tensor([2])):
        assert torch.equal(sample(c2i_pipe, num_inference_steps=steps), expected)
    with pytest.raises(ValueError, match=r"--steps takes one step count \(used at every stage\) or one per stage "
                                         r"\(4 stages\), got 2 values \[1, 2\]"):
        steps_per_stage([1, 2], 4, "--steps")
    with pytest.raises(ValueError, match=r"--steps must be >= 1 at every stage, got \[1, 0, 1, 1\]"):
        steps_per_stage([1, 0, 1, 1], 4, "--steps")


def test_given_noise_alone_decides_dopri5_with_guidance(c2i_pipe):
    """dopri5 with guidance reads block-noise rows B..2B for the release's doubled state. With only B rows
    given, that state reuses them: the result no longer depends on a generator, and equals passing the B
    rows twice."""
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    noise = noise_for(2)
    run = lambda stage_noise, seed: sample(c2i_pipe, seed=seed, solver="dopri5", latents=latents,  # noqa: E731
                                           stage_noise=stage_noise, guidance_scale=2.0)
    first = run(noise, seed=0)
    assert torch.equal(first, run(noise, seed=1))
    assert torch.equal(first, run([torch.cat([n, n]) for n in noise], seed=2))
    # Control: other shadow rows change the step sizes and hence (slightly) the images.
    other = [torch.cat([n, torch.randn(n.shape, generator=torch.Generator().manual_seed(5))]) for n in noise]
    assert not torch.equal(first, run(other, seed=0))


def test_dopri5_runs_the_doubled_state_whenever_guidance_is_above_zero(c2i_pipe):
    """As the release: any g > 0 (even g <= 1) doubles the dopri5 state, whose rows B..2B of block noise then
    enter the step size; g = 0 runs no doubled state, so those rows are never read."""
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    noise = noise_for(2)
    other = [torch.cat([n, torch.randn(n.shape, generator=torch.Generator().manual_seed(5))]) for n in noise]
    run = lambda stage_noise, g: sample(c2i_pipe, solver="dopri5", latents=latents,  # noqa: E731
                                        stage_noise=stage_noise, guidance_scale=g)
    for g in (0.5, 1.0):
        assert not torch.equal(run(noise, g), run(other, g)), g
    assert torch.equal(run(noise, 0.0), run(other, 0.0))


def test_null_label_is_for_the_network_not_the_pipeline(c2i_pipe):
    null = c2i_pipe.model.null_label
    assert null == c2i_pipe.model.num_classes == 1000
    with torch.no_grad():
        v = c2i_pipe.model(torch.randn(1, 3, 8, 8), torch.tensor([10.0]), class_labels=torch.tensor([null]))
    assert torch.isfinite(v).all() and v.abs().max() > 0
    with pytest.raises(ValueError, match=str(null)):
        sample(c2i_pipe, class_labels=[null])


def test_images_per_prompt_are_each_prompt_repeated_in_place(c2i_pipe, t2i_pipe, generators):
    many = sample(c2i_pipe, class_labels=[3, 7], num_images_per_prompt=2, generator=generators(1, 2, 3, 4))
    spelled = sample(c2i_pipe, class_labels=[3, 3, 7, 7], generator=generators(1, 2, 3, 4))
    assert torch.equal(many, spelled)
    many = text_sample(t2i_pipe, negative_prompt=["dark", ""], num_images_per_prompt=2,
                       generator=generators(1, 2, 3, 4))
    spelled = text_sample(t2i_pipe, prompt=["a red fox", "a red fox", "blue", "blue"],
                          negative_prompt=["dark", "dark", "", ""], generator=generators(1, 2, 3, 4))
    assert (many - spelled).abs().max().item() < 1e-5


def test_numpy_count_of_images_per_prompt(c2i_pipe):
    a = sample(c2i_pipe, class_labels=[3], num_images_per_prompt=np.int64(2))
    assert a.shape[0] == 2


def test_prompts_must_be_strings(t2i_pipe):
    with pytest.raises(ValueError, match="prompt must be a string or a list of strings, got 5"):
        text_sample(t2i_pipe, prompt=5)
    with pytest.raises(ValueError, match="negative_prompt must be a string or a list of strings"):
        text_sample(t2i_pipe, negative_prompt=[1, 2])


def test_a_given_text_encoder_samples_in_eval_mode_and_must_fit(tmp_path):
    """A T5 built in training mode (dropout on) gives the same images for the same seed once loaded; one of
    the wrong width is refused at load time, naming both widths."""
    from transformers import T5Config, T5EncoderModel

    from pixelflow.pipeline import PixelFlowPipeline
    from pixelflow.text import ByteTokenizer
    from pathlib import Path
    folder = Path(__file__).resolve().parent / "golden" / "t2i_ckpt"
    encoder = T5EncoderModel(T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=24, d_kv=12, d_ff=48,
                                      num_layers=1, num_heads=2, dropout_rate=0.5))
    assert encoder.training
    pipe = PixelFlowPipeline.from_pretrained(folder, text_encoder=encoder, tokenizer=ByteTokenizer())
    pipe.max_text_length = 16
    assert not pipe.text_encoder.training
    assert torch.equal(text_sample(pipe, num_inference_steps=1), text_sample(pipe, num_inference_steps=1))
    wide = T5EncoderModel(T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=32, d_kv=16, d_ff=64,
                                   num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="32-wide features .* cross_attention_dim is 24"):
        PixelFlowPipeline.from_pretrained(folder, text_encoder=wide, tokenizer=ByteTokenizer())


# ---------------------------------------------------------------------------------------------- later checks
def test_a_model_set_on_the_pipeline_is_the_one_sampled(c2i_pipe):
    import copy
    from pixelflow.pipeline import PixelFlowPipeline
    pipe = PixelFlowPipeline(c2i_pipe.model, c2i_pipe.scheduler, resolution=SIZE)
    other = copy.deepcopy(c2i_pipe.model)
    with torch.no_grad():
        for w in other.parameters():
            w.mul_(1.1)
    before = sample(pipe)
    pipe.model = other
    assert pipe.denoiser is other
    expected = sample(PixelFlowPipeline(other, c2i_pipe.scheduler, resolution=SIZE))
    assert torch.equal(sample(pipe), expected) and not torch.equal(before, expected)
    custom = lambda *a, **k: other(*a, **k)  # noqa: E731 - a denoiser set by hand stays
    pipe.denoiser = custom
    pipe.model = c2i_pipe.model
    assert pipe.denoiser is custom


@pytest.mark.parametrize("kwargs, message", [
    (dict(negative_prompt="ugly"), "class-to-image model: negative_prompt would be ignored"),
    (dict(class_labels=[[3, 7]]), r"one label per image, \(B,\), got shape \(1, 2\)"),
    (dict(latents=torch.full((2, 3, 4, 4), float("nan"))), "latents hold NaN"),
    (dict(solver="dopri5", atol=-1.0), "atol must be a finite number > 0, got -1.0"),
    (dict(solver="dopri5", rtol=float("nan")), "rtol must be a finite number > 0, got nan"),
    (dict(solver="dopri5", atol="x"), "atol must be a finite number > 0, got 'x'"),
])
def test_more_bad_inputs_are_named_before_any_work(c2i_pipe, kwargs, message):
    calls = []
    model = c2i_pipe.model
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            sample(c2i_pipe, **kwargs)
    finally:
        hook.remove()
    assert not calls


def test_tolerances_and_labels_in_other_numeric_forms(c2i_pipe):
    dopri5 = dict(solver="dopri5", num_inference_steps=1)
    assert torch.equal(sample(c2i_pipe, atol=torch.tensor(1e-3), rtol=np.float32(1e-3), **dopri5),
                       sample(c2i_pipe, atol=1e-3, rtol=float(np.float32(1e-3)), **dopri5))
    assert torch.equal(sample(c2i_pipe, class_labels=torch.tensor([[3], [7]])), sample(c2i_pipe))


def test_stage_noise_must_be_finite(c2i_pipe):
    noise = [torch.randn(2, 3, 4 << k, 4 << k) for k in (1, 2, 3)]
    noise[1][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"stage_noise\[1\] \(stage 2\) holds NaN or infinite"):
        sample(c2i_pipe, stage_noise=noise)


def test_half_weights_without_autocast_are_refused(c2i_pipe):
    import copy
    from pixelflow.pipeline import PixelFlowPipeline
    pipe = PixelFlowPipeline(copy.deepcopy(c2i_pipe.model).to(torch.bfloat16), c2i_pipe.scheduler, resolution=SIZE)
    with pytest.raises(ValueError, match="weights are torch.bfloat16.*autocast_dtype"):
        sample(pipe)
    pipe.autocast_dtype = torch.bfloat16
    assert sample(pipe).shape == (2, SIZE, SIZE, 3)


def test_a_misspelled_key_in_a_checkpoint_config_is_refused(tmp_path):
    # num_stage (for num_stages) used to load silently and sample with the default 4 stages.
    import shutil
    import warnings

    from conftest import C2I_CKPT
    from pixelflow.pipeline import PixelFlowPipeline
    folder = tmp_path / "ckpt"
    shutil.copytree(C2I_CKPT, folder)
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("num_stages: 4", "num_stage: 3"))
    with pytest.raises(ValueError, match="unknown config key 'scheduler.num_stage'"):
        PixelFlowPipeline.from_pretrained(folder)
    # Keys loading never reads (how the folder was trained) are named in a warning, not refused.
    (folder / "config.yaml").write_text(text + "train:\n  lr: 1.0e-4\n  warmup: 10\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PixelFlowPipeline.from_pretrained(folder)
    assert sum("train.warmup" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings(record=True) as caught:  # said once per file, not at every read
        warnings.simplefilter("always")
        PixelFlowPipeline.from_pretrained(folder)
    assert not any("train.warmup" in str(w.message) for w in caught)


def test_dopri5_guidance_state_does_not_depend_on_the_schedule_name(c2i_pipe):
    # g = 1 gives weight 1 at every stage under either schedule. The release doubles the dopri5 state whenever
    # g > 0, so both must run that doubled state and agree; "constant" used to drop it and differ.
    args = dict(class_labels=[3, 7], height=SIZE, width=SIZE, guidance_scale=1.0, solver="dopri5",
                output_type="pt")
    ramp = c2i_pipe(generator=torch.Generator().manual_seed(5), **args)
    constant = c2i_pipe(generator=torch.Generator().manual_seed(5), guidance_schedule="constant", **args)
    assert torch.equal(ramp, constant)
    with pytest.raises(ValueError, match="guidance_schedule must be one of .*'flat'"):
        c2i_pipe(guidance_schedule="flat", **args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage_noise=[torch.zeros(2, 3, 8, 8)] * 2), "stage_noise"),
    (dict(latents=torch.zeros(1, 3, 4, 4)), "latents must be"),
    (dict(generator=[torch.Generator()]), "generator"),
])
def test_text_inputs_are_checked_before_the_text_encoder_runs(t2i_pipe, monkeypatch, kwargs, message):
    # The prompts used to be encoded first, so a bad stage_noise cost a T5 forward (seconds for flan-t5-xl).
    def no_encoder(*args, **kwargs):
        raise AssertionError("the text encoder ran before the inputs were checked")

    monkeypatch.setattr(t2i_pipe, "encode_prompt", no_encoder)
    with pytest.raises(ValueError, match=message):
        text_sample(t2i_pipe, **kwargs)


@pytest.mark.parametrize("solver", ["euler", "dopri5"])
def test_non_finite_samples_are_an_error_not_black_pixels(make_tiny_model, solver):
    from pixelflow.pipeline import PixelFlowPipeline
    from pixelflow.scheduler import PixelFlowScheduler
    model = make_tiny_model().eval()
    with torch.no_grad():
        model.proj_out_2.bias[0] = float("nan")
    pipe = PixelFlowPipeline(model, PixelFlowScheduler(num_stages=2), resolution=8)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):  # dopri5's step size underflows first
        pipe(class_labels=[0], num_inference_steps=1, solver=solver, output_type="uint8")


def test_an_unconditional_model_is_named_as_such(make_tiny_model):
    from pixelflow.pipeline import PixelFlowPipeline
    from pixelflow.scheduler import PixelFlowScheduler
    pipe = PixelFlowPipeline(make_tiny_model(num_classes=0), PixelFlowScheduler(num_stages=2), resolution=8)
    with pytest.raises(ValueError, match="neither class- nor text-conditional"):
        pipe(prompt=["a fox"], num_inference_steps=1)
