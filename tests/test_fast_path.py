"""The fast sampling path (pixelflow.fast) computes what the plain path computes, switch by switch, on the CPU.

Every switch that runs on the CPU is compared with the plain model in float32 (tight tolerance) and with the
release's golden sampling runs; torch.compile is checked for graph capture with the aot_eager backend (the
same traced graph inductor would compile) and once with inductor itself (marked slow). CUDA-only switches
(CUDA graphs, SDPA kernel choice, bf16 on the GPU) are checked by benchmarks/gpu_check.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pixelflow import fast, norm_kernels
from pixelflow.pipeline import PixelFlowPipeline

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
EXACT_ATOL = 1e-6     # float32: merged matmuls may only reassociate sums
SAMPLING_ATOL = 1e-4  # golden README: whole sampling runs to about 1e-4
ALL_CPU_SWITCHES = dict(merge_qkv=True, merge_adaln=True, attention="math", head_pad=24, fused_gelu=True,
                        fused_norms=True)
EAGER_COMPILE = dict(compile=True, compile_backend="aot_eager")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def pipe() -> PixelFlowPipeline:
    """A private golden class-to-image pipeline (the session one stays untouched)."""
    return PixelFlowPipeline.from_pretrained(GOLDEN_DIR / "c2i_ckpt", device="cpu")


@pytest.fixture
def plain_pipe(pipe):
    fast.plain(pipe)
    pipe.autocast_dtype = None
    yield pipe
    fast.plain(pipe)
    pipe.autocast_dtype = None


def forward_inputs(seed: int = 0, batch: int = 3, size: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.rand(batch, generator=gen) * 999
    labels = torch.randint(0, 1000, (batch,), generator=gen)
    labels[-1] = 1000  # the null label
    return x, t, labels


def denoiser(model, **switches) -> fast.FastDenoiser:
    options = fast.FastOptions(**{"merge_qkv": False, "merge_adaln": False, "attention": "default",
                                  **switches}).resolve("cpu")
    return fast.FastDenoiser(model, options)


# ---------------------------------------------------------------------------------------------- switches
def test_defaults_leave_the_cpu_path_plain(plain_pipe):
    fast.accelerate(plain_pipe)
    assert plain_pipe.denoiser is plain_pipe.model
    assert plain_pipe.autocast_dtype is None


def test_every_switch_can_be_turned_off(plain_pipe):
    off = dict(merge_qkv=False, merge_adaln=False, compile=False, attention="default", cuda_graphs=False,
               precision="keep", head_pad=0, fused_gelu=False, fused_norms=False)
    assert fast.FastOptions(**off).resolve("cpu").is_plain
    assert fast.FastOptions(**off).resolve("cuda").is_plain  # resolving touches no GPU
    fast.accelerate(plain_pipe, **off)
    assert plain_pipe.denoiser is plain_pipe.model
    for name, on in [("merge_qkv", True), ("merge_adaln", True), ("compile", True), ("attention", "math"),
                     ("head_pad", 32), ("fused_gelu", True), ("fused_norms", True), ("fused_residual", True)]:
        options = fast.FastOptions(**{**off, name: on}).resolve("cpu")
        assert not options.is_plain and getattr(options, name) == on
    cuda = fast.FastOptions().resolve("cuda")
    assert (cuda.precision, cuda.merge_qkv, cuda.merge_adaln, cuda.compile, cuda.attention, cuda.cuda_graphs,
            cuda.head_pad, cuda.fused_gelu) == ("bf16", True, True, True, "auto", "auto", "auto", True)
    assert cuda.fused_norms == cuda.fused_residual == norm_kernels.available()  # the Triton kernels, if Triton imports
    assert fast.FastOptions(fused_norms=False).resolve("cuda").fused_residual is False  # "auto" follows fused_norms
    # A fixed kernel pads only when told to; the CPU resolves "auto" to the plain choice.
    assert fast.FastOptions(attention="cudnn").resolve("cuda").head_pad == 0
    cpu = fast.FastOptions().resolve("cpu")
    assert (cpu.head_pad, cpu.fused_gelu, cpu.fused_norms, cpu.fused_residual) == (0, False, False, False)


@pytest.mark.parametrize("bad, message", [
    (dict(precision="int8"), "precision"), (dict(compile="yes"), "compile"), (dict(attention="xformers"), "attention"),
    (dict(cuda_graphs=True), "CUDA"), (dict(attention="flash"), "CUDA"),
    (dict(graph_max_tokens=-1), "graph_max_tokens"), (dict(head_pad=70), "head_pad"),
    (dict(head_pad=True), "head_pad"), (dict(fused_gelu="yes"), "fused_gelu"), (dict(fused_norms="on"), "fused_norms"),
    (dict(compile_mode_min_tokens=-5), "compile_mode_min_tokens"),
    (dict(compile_mode_min_tokens=4096), "compile_mode is None"),
])
def test_bad_options_are_named(plain_pipe, bad, message):
    with pytest.raises(ValueError, match=message):
        fast.accelerate(plain_pipe, **bad)


def test_fast_denoiser_needs_resolved_switches(pipe):
    for name in ("fused_gelu", "fused_norms"):
        options = fast.FastOptions().resolve("cpu")
        with pytest.raises(ValueError, match="resolved options"):
            fast.FastDenoiser(pipe.model, dataclasses.replace(options, **{name: "auto"}))


def test_unknown_switch_is_an_error(plain_pipe):
    with pytest.raises(ValueError, match="unknown fast-path switch"):
        fast.accelerate(plain_pipe, compile_everything=True)


# ---------------------------------------------------------------------------------------------- forwards
@pytest.mark.parametrize("switches", [
    {}, dict(merge_qkv=True), dict(merge_adaln=True), dict(attention="math"), dict(head_pad=24),
    dict(head_pad=128, attention="math"), dict(fused_gelu=True), dict(fused_norms=True, fused_residual=False),
    dict(fused_residual=True), ALL_CPU_SWITCHES,
], ids=["none", "merge_qkv", "merge_adaln", "attention_math", "head_pad_24", "head_pad_128", "fused_gelu",
        "fused_norms", "fused_residual", "all"])
def test_forward_equals_model(pipe, switches):
    x, t, labels = forward_inputs()
    with torch.no_grad():
        expected = pipe.model(x, t, class_labels=labels)
        out = denoiser(pipe.model, **switches)(x, t, class_labels=labels)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if not switches:  # nothing merged: the very same operations in the same order
        assert torch.equal(out, expected)
    assert max_abs(out, expected) < EXACT_ATOL


@pytest.mark.parametrize("switches", [{}, ALL_CPU_SWITCHES], ids=["none", "all"])
def test_forward_equals_model_on_non_square_images(pipe, switches):
    # The grid-side embedding and the RoPE table must follow the model's choice of side (the token-grid width).
    x, t, labels = forward_inputs()
    x = torch.cat([x, x], dim=-1)[:, :, :8]  # (3, 3, 8, 32): a 4 x 16 token grid
    with torch.no_grad():
        expected = pipe.model(x, t, class_labels=labels)
        out = denoiser(pipe.model, **switches)(x, t, class_labels=labels)
    assert out.shape == expected.shape == x.shape
    assert max_abs(out, expected) < EXACT_ATOL


def test_head_pad_smaller_than_the_heads_is_refused(pipe):
    with pytest.raises(ValueError, match="head_pad 8 is smaller than the model's attention_head_dim 16"):
        denoiser(pipe.model, head_pad=8)


def test_head_pad_sizes():
    assert fast.head_sizes(72, "auto") == (0, 80, 96, 128)  # XL: 72 rounded up to 16 and 32, and 128
    assert fast.head_sizes(64, "auto") == (0, 128)
    assert fast.head_sizes(128, "auto") == (0,)
    assert fast.head_sizes(72, 96) == (96,) and fast.head_sizes(72, 0) == (0,) and fast.head_sizes(72, 72) == (0,)


def test_padded_attention_is_exact_attention():
    """Zero channels change nothing: padded heads with the unpadded scale give the unpadded result."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 12, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = fast._attend(q, k, v, "sdpa")
    padded = fast._attend(*(fast.pad_heads(t, 32) for t in (q, k, v)), "sdpa", scale=12 ** -0.5)
    assert padded.shape == (2, 10, 3, 32) and torch.all(padded[..., 12:] == 0)
    assert (padded[..., :12] - expected).abs().max().item() < 1e-12


def test_fused_gelu_uses_the_epilogue_only_where_checked(monkeypatch):
    """The fused branch (argument order, transpose, reshape) runs on the CPU with a stand-in tanh epilogue;
    without a passed check the op runs GEMM and GELU apart. Under autocast it keeps its input's dtype."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 16, generator=gen), torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    expected = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
    calls = []

    def tanh_epilogue(bias, mat1, mat2, use_gelu=False):
        calls.append((tuple(mat1.shape), tuple(mat2.shape), use_gelu))
        return torch.nn.functional.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")

    monkeypatch.setattr(torch, "_addmm_activation", tanh_epilogue)
    monkeypatch.setattr(fast, "_EPILOGUE_IS_TANH", {})
    assert torch.equal(fast.linear_gelu_tanh(x, w, b), expected) and calls == []  # not checked: unfused
    monkeypatch.setattr(fast, "_EPILOGUE_IS_TANH", {(torch.device("cpu"), torch.float32): True})
    out = fast.linear_gelu_tanh(x, w, b)
    assert calls == [((10, 16), (16, 24), True)]
    assert out.shape == (2, 5, 24) and (out - expected).abs().max().item() < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.linear_gelu_tanh(x, w, b).dtype == torch.float32
        compiled = torch.compile(fast.linear_gelu_tanh, backend="aot_eager", fullgraph=True)
        assert compiled(x, w, b).dtype == torch.float32


def test_attention_measurement_times_padding_and_projection():
    """The auto pick compares kernels with what padding costs around them (pads, wider o_proj input)."""
    results = fast.measure_attention(2, 16, 3, 12, torch.float32, "cpu", kernels=("math",), pads=(0, 16, 32),
                                     out_dim=20)
    assert set(results) == {"math", "math@16", "math@32"}
    for label, r in results.items():
        assert r["error"] is None and r["seconds"] > 0 and r["max_err"] < 1e-5, (label, r)
        assert r["contiguous"] is False, (label, r)  # SDPA's (B, H, L, d) output seen as (B, L, H, d)
    measured = fast.measure_attention(2, 16, 3, 12, torch.float32, "cpu", pads=(0, 16), out_dim=36)
    exact = {(r["kernel"], r["pad"]) for r in measured.values() if r["seconds"]}
    assert exact, measured  # PyTorch's CPU flash kernel at least
    assert fast.pick_attention(2, 16, 3, 12, torch.float32, "cpu", pads=(0, 16)) in exact


def test_padded_candidates_are_timed_from_padded_inputs(monkeypatch):
    """The fast path makes q, k and v padded where they are made (with fused_norms), so the measurement times
    padded candidates from padded inputs, with what _self_attention pads per call: the o_proj weight's columns
    and the qkv weight's v rows. prepadded=False (no fused_norms: the norm's output is copied into padded heads)
    times the q and k copies too; v is still made padded by its weight."""
    pads_in_call = []
    real_heads, real_rows = fast.pad_heads, fast._pad_rows
    monkeypatch.setattr(fast, "pad_heads", lambda t, size: pads_in_call.append("heads") or real_heads(t, size))
    monkeypatch.setattr(fast, "_pad_rows", lambda t, h, size: pads_in_call.append("rows") or real_rows(t, h, size))

    def timed(call, *args, **kwargs):  # "seconds": 1 + the pads made in the timed call
        pads_in_call.clear()
        call()
        return 1.0 + len(pads_in_call)

    monkeypatch.setattr(fast, "median_seconds", timed)
    for prepadded, pads in ((True, ["rows", "heads"]), (False, ["rows", "heads", "heads", "heads"])):
        results = fast.measure_attention(2, 16, 3, 12, torch.float32, "cpu", kernels=("math",), pads=(0, 16),
                                         out_dim=20, prepadded=prepadded)
        assert results["math"]["seconds"] == 1.0 and results["math@16"]["seconds"] == 1.0 + len(pads), results
        assert results["math@16"]["max_err"] < 1e-5
        timed(lambda: None)
        results = fast.measure_attention(2, 16, 3, 12, torch.float32, "cpu", kernels=("math",), pads=(16,),
                                         prepadded=prepadded)  # without out_dim: the kernel alone
        assert results["math@16"]["seconds"] == 1.0 + (0 if prepadded else 2)


def test_fused_norms_are_checked_at_the_padded_head_size(pipe, monkeypatch):
    """An asked-for head_pad whose padded RMSNorm + RoPE kernel fails its device check turns fused_norms off
    (the unpadded check alone passing is not enough)."""
    monkeypatch.setattr(norm_kernels, "INTERPRET", True)  # as on CUDA: the fast path asks works()
    monkeypatch.setattr(norm_kernels, "works", lambda *args, pads=(), **kwargs: not pads)
    for head_pad, on in ((0, True), (24, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            den = denoiser(pipe.model, fused_norms=True, fused_residual=False, head_pad=head_pad)
        assert den.status()["fused_norms"] is on, head_pad
        assert any("fused_norms is off" in str(w.message) for w in caught) is (not on)


def test_attention_measurement_is_told_whether_heads_come_padded(pipe, monkeypatch):
    """With fused_norms the measurement times padded candidates from padded inputs; without, with the q and k
    copies the forward then makes."""
    seen = []
    monkeypatch.setattr(fast, "pick_attention",
                        lambda *a, **k: seen.append(k["prepadded"]) or ("math", k["pads"][-1]))
    x, t, labels = forward_inputs()
    for fused_norms in (False, True):
        options = fast.FastOptions(precision="keep", merge_qkv=False, merge_adaln=False, compile=False,
                                   attention="auto", head_pad=24, fused_gelu=False, fused_norms=fused_norms,
                                   fused_residual=False, cuda_graphs=False)
        with torch.no_grad():
            den = fast.FastDenoiser(pipe.model, options)
            assert (den(x, t, class_labels=labels) - pipe.model(x, t, class_labels=labels)).abs().max() < 1e-6
    assert seen == [False, True]


# A stand-in for FlashAttention-4: flash_attn/cute/ with flash_attn_func(q, k, v, softmax_scale=...) -> (out, lse)
# on (B, L, H, d) tensors, as the real one. It attends with SDPA and records its calls. Its flash_attn/ is a
# regular package placed first on sys.path, so that an installed flash-attn 2 cannot hide it.
FA4_STAND_IN = """
import torch

calls = []


def flash_attn_func(q, k, v, softmax_scale=None, **ignored):
    calls.append((tuple(q.shape), softmax_scale, q.dtype))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
    return out.transpose(1, 2), None  # not contiguous, unlike the kernel's output: the op must not care
"""


def _flash_attn_modules() -> list[str]:
    return [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]


def _without_flash_attn_modules(monkeypatch):
    """Hides imported flash_attn modules for this test; monkeypatch puts them back after it."""
    for name in _flash_attn_modules():
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(fast, "_IMPORTABLE", {})


@pytest.fixture
def install_flash_attn(tmp_path, monkeypatch):
    """install(cute_source): a package flash_attn/cute/ with that __init__.py, first on sys.path, for this test."""
    def install(cute_source: str) -> None:
        package = tmp_path / "flash_attn" / "cute"
        package.mkdir(parents=True)
        (package.parent / "__init__.py").write_text("")
        (package / "__init__.py").write_text(cute_source)
        _without_flash_attn_modules(monkeypatch)
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install
    for name in _flash_attn_modules():
        del sys.modules[name]  # the installed package's; monkeypatch then restores any that were there before


@pytest.fixture
def fa4_stand_in(install_flash_attn):
    install_flash_attn(FA4_STAND_IN)


def test_fa4_is_found_only_when_installed(fa4_stand_in):
    assert fast.kernel_installed("fa4")
    assert not fast.kernel_installed("flash_attn")  # FA4's package is not flash-attn 2
    assert fast.kernel_installed("cudnn")
    with pytest.raises(ValueError, match="attention='fa4' needs a CUDA model"):
        fast.FastOptions(attention="fa4").resolve("cpu")
    assert fast.FastOptions(attention="fa4").resolve("cuda").attention == "fa4"
    with pytest.raises(ValueError, match="attention='fa4' runs in bf16 or fp16 only, got precision='fp32'"):
        fast.FastOptions(attention="fa4", precision="fp32").resolve("cuda")


def test_fa4_missing_or_broken_is_named(monkeypatch, install_flash_attn):
    _without_flash_attn_modules(monkeypatch)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed, whatever this machine has
    assert not fast.kernel_installed("fa4") and not fast.kernel_installed("flash_attn")
    with pytest.raises(ValueError, match="flash-attn-4 is not installed or does not import"):
        fast.FastOptions(attention="fa4").resolve("cuda")
    # Installed but failing at import (as flash-attn 2.8's older flash_attn/cute under a newer cutlass-dsl):
    install_flash_attn("raise AttributeError('module cutlass has no attribute Float32')\n")
    assert not fast.kernel_installed("fa4")
    results = fast.measure_attention(2, 16, 3, 16, torch.float32, "cpu")
    assert "fa4" not in results and results  # not a candidate; the others still measured


def test_fa4_kernel_is_exact_attention_and_one_compiled_region(fa4_stand_in, pipe):
    """Through the stand-in: FA4's layout (no transposes), the softmax scale at padded heads, the opaque op in
    a fullgraph compile, the auto measurement (unpadded only), and a whole forward equal to the model."""
    import flash_attn.cute as stand_in

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 16, generator=gen) for _ in range(3))
    expected = fast._attend(q, k, v, "sdpa")
    assert max_abs(fast._attend(q, k, v, "fa4"), expected) < 1e-6
    padded = fast._attend(*(fast.pad_heads(t, 32) for t in (q, k, v)), "fa4", scale=16 ** -0.5)
    assert max_abs(padded[..., :16], expected) < 1e-6 and torch.all(padded[..., 16:] == 0)
    assert [c[:2] for c in stand_in.calls] == [((2, 10, 3, 16), 0.25), ((2, 10, 3, 32), 0.25)]

    results = fast.measure_attention(2, 16, 3, 16, torch.float32, "cpu", pads=(0, 32))
    assert "fa4" in results and "fa4@32" not in results  # a multiple of 16 as it is: no padded compiles
    # XL's 72 is padded to 80 inside FA4, with predicated loads: 80 given padded is a candidate, larger not
    results = fast.measure_attention(2, 16, 3, 24, torch.float32, "cpu", pads=fast.head_sizes(24, "auto"))
    assert fast.head_sizes(24, "auto") == (0, 32, 128)
    assert {"fa4", "fa4@32"} <= set(results) and "fa4@128" not in results and "flash@128" in results
    assert results["fa4@32"]["error"] is None and results["fa4@32"]["max_err"] < 1e-5
    assert results["fa4"]["error"] is None and results["fa4"]["max_err"] < 1e-5
    assert results["fa4"]["contiguous"] is True  # heads flatten for o_proj without a copy

    model = pipe.model
    options = fast.FastOptions(precision="keep", merge_qkv=True, merge_adaln=True, compile=True,
                               compile_backend="aot_eager", attention="fa4", head_pad=0, fused_gelu=False,
                               fused_norms=False, fused_residual=False, cuda_graphs=False)
    torch._dynamo.reset()
    den = fast.FastDenoiser(model, options)
    x, t, labels = forward_inputs()
    stand_in.calls.clear()
    with torch.no_grad():
        out = den(x, t, class_labels=labels)
        assert max_abs(out, model(x, t, class_labels=labels)) < EXACT_ATOL
    assert stand_in.calls and all(c[0][2:] == (model.num_attention_heads, model.attention_head_dim)
                                  for c in stand_in.calls)
    tokens = (x.shape[-1] // model.patch_size) ** 2
    assert den.attention_choice == {(3, tokens): "fa4"} and den.status()["compiled_shapes"] == 1


def _fa4_interface(package, monkeypatch, signature: str, config: dict):
    """A stand-in flash_attn/cute/interface.py whose _flash_attn_fwd has `signature` and records its tilings
    (returned, imported); fast's FA4 caches cleared and FA4_CONFIG set to `config` for this test."""
    (Path(package.__file__).parent / "interface.py").write_text(FA4_STAND_IN.replace(
        "def flash_attn_func(q, k, v, softmax_scale=None, **ignored):",
        f"def _flash_attn_fwd({signature}):\n    tilings.append(ignored)") + "\ntilings = []\n")
    monkeypatch.setattr(fast, "_FA4_TILED", [])
    monkeypatch.setattr(fast, "_FA4_UNTILED_WARNED", set())
    monkeypatch.setattr(fast, "FA4_CONFIG", dict(config))
    import flash_attn.cute.interface as interface
    return interface


def test_fa4_tiling_goes_to_the_kernel(fa4_stand_in, monkeypatch):
    """With FA4_CONFIG naming a tiling for the head size, the op calls FA4's _flash_attn_fwd with it (and the same
    result); other head sizes go to the public function, with the library's own tiling."""
    import flash_attn.cute as package

    interface = _fa4_interface(package, monkeypatch, "q, k, v, softmax_scale=None, **ignored",
                               {16: dict(fast.FA4_TILINGS[1])})
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 16, generator=gen) for _ in range(3))
    out = fast._attend(q, k, v, "fa4")
    assert max_abs(out, fast._attend(q, k, v, "sdpa")) < 1e-6 and out.is_contiguous()
    assert interface.tilings == [{"tile_mn": (128, 128), "mma_pv_is_rs": True, "intra_wg_overlap": True}]
    assert interface.calls and not package.calls  # the public function is not called with a tiling set

    q, k, v = (torch.randn(2, 10, 3, 24, generator=gen) for _ in range(3))
    out = fast._attend(q, k, v, "fa4")  # no tiling for head size 24
    assert max_abs(out, fast._attend(q, k, v, "sdpa")) < 1e-6
    assert len(interface.tilings) == 1 and package.calls[-1][0] == (2, 10, 3, 24)


def test_fa4_without_tiling_arguments_uses_its_own_tiles(fa4_stand_in, monkeypatch):
    """An FA4 whose _flash_attn_fwd takes no tiling arguments: a warning, once, and the public function."""
    import flash_attn.cute as package

    _fa4_interface(package, monkeypatch, "q, k, v, softmax_scale=None, ignored=None", {16: dict(fast.FA4_TILINGS[0])})
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 16, generator=gen) for _ in range(3))
    with pytest.warns(UserWarning, match="takes no tiling arguments"):
        out = fast._attend(q, k, v, "fa4")
    assert max_abs(out, fast._attend(q, k, v, "sdpa")) < 1e-6 and package.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast._attend(q, k, v, "fa4")  # warned once


def test_shipped_fa4_tilings_are_well_formed():
    """Every tiling gpu_check times, and every shipped one, is one _flash_attn_fwd accepts in form."""
    for config in (*fast.FA4_TILINGS, *fast.FA4_CONFIG.values()):
        assert set(config) == {"tile_mn", "mma_pv_is_rs", "intra_wg_overlap"}
        assert len(config["tile_mn"]) == 2 and all(t % 16 == 0 for t in config["tile_mn"])
    assert all(isinstance(d, int) and d % 8 == 0 for d in fast.FA4_CONFIG)
    assert len({str(c) for c in fast.FA4_TILINGS}) == len(fast.FA4_TILINGS)
    assert all(c in fast.FA4_TILINGS for c in fast.FA4_CONFIG.values())  # shipped tilings were timed


def _gpu_check_fa4(package, monkeypatch, shipped: dict):
    sys.path.insert(0, str(BENCHMARKS_DIR))
    import gpu_check
    from types import SimpleNamespace

    _fa4_interface(package, monkeypatch, "q, k, v, softmax_scale=None, **ignored", shipped)
    return gpu_check, SimpleNamespace(num_attention_heads=2, attention_head_dim=24, patch_size=2)


def test_gpu_check_times_every_fa4_tiling_and_restores_the_shipped_one(fa4_stand_in, monkeypatch, capsys):
    """gpu_check's FA4 section: at the model's head size and at it padded to 16 (the padded inputs cut back
    are still exact attention), the library's own tiling, the shipped one for that size first, then every other
    one of FA4_TILINGS. Without adopt, FA4_CONFIG is as shipped afterwards."""
    import flash_attn.cute as package

    shipped = {24: dict(fast.FA4_TILINGS[3]), 32: dict(fast.FA4_TILINGS[4])}
    gpu_check, model = _gpu_check_fa4(package, monkeypatch, shipped)
    import flash_attn.cute.interface as interface

    check = gpu_check.Check(600, None)
    gpu_check.fa4_tilings_check(check, torch.device("cpu"), model, 2, 8, adopt=False)
    out = capsys.readouterr().out
    rows = check.results["fa4_tilings"]
    n = 1 + len(fast.FA4_TILINGS)
    assert [r["head_size"] for r in rows] == [24] * n + [32] * n
    for size, part in ((24, rows[:n]), (32, rows[n:])):
        assert [r["config"] for r in part[:2]] == [None, shipped[size]]
        assert {str(r["config"]) for r in part[1:]} == {str(c) for c in fast.FA4_TILINGS}
        assert f"| {shipped[size]} (shipped) |" in out
    assert all(r["max_abs"] < 1e-5 for r in rows)  # the padded ones too, cut back to 24
    assert {str(t) for t in interface.tilings} == {str(c) for c in fast.FA4_TILINGS}  # each reached the kernel
    assert {c[0][-1] for c in package.calls} == {24, 32}  # the library's own tiling: the public function
    assert "zero-padded before the call" in out and "to ship it" not in out
    assert fast.FA4_CONFIG == shipped


def test_gpu_check_adopts_the_fastest_fa4_tiling_per_head_size(fa4_stand_in, monkeypatch, capsys):
    """With adopt, each head size keeps its fastest tiling when it beats the shipped one by over 2 %: timings
    faked, one tiling per size twice as fast. The padded size's runs must not undo the model size's adoption."""
    import flash_attn.cute as package

    shipped = {24: dict(fast.FA4_TILINGS[0]), 32: dict(fast.FA4_TILINGS[0])}
    gpu_check, model = _gpu_check_fa4(package, monkeypatch, shipped)
    fast_at = {24: fast.FA4_TILINGS[5], 32: fast.FA4_TILINGS[2]}

    def timed(call, device, **kwargs):  # run() calls the kernel once before timing it: the size timed
        size = call_sizes[-1]
        return 1.0 if fast.FA4_CONFIG.get(size) == fast_at[size] else 2.0

    call_sizes = []
    real = fast.fa4_attention
    monkeypatch.setattr(fast, "fa4_attention", lambda q, *a: call_sizes.append(q.shape[-1]) or real(q, *a))
    monkeypatch.setattr(fast, "median_seconds", timed)
    check = gpu_check.Check(600, None)
    gpu_check.fa4_tilings_check(check, torch.device("cpu"), model, 2, 8)
    assert fast.FA4_CONFIG == {24: fast_at[24], 32: fast_at[32]}
    assert check.results["fa4_config_adopted"] == {24: fast_at[24], 32: fast_at[32]}
    out = capsys.readouterr().out
    assert f"to ship it: fast.FA4_CONFIG[24] = {fast_at[24]!r}" in out
    assert f"to ship it: fast.FA4_CONFIG[32] = {fast_at[32]!r}" in out


def test_gpu_check_never_adopts_an_inexact_fa4_tiling(fa4_stand_in, monkeypatch):
    """A tiling whose output is off (here: twice the attention) is not a candidate, however fast: the fastest
    exact one is adopted, at the model's head size and at the padded one."""
    import flash_attn.cute as package

    gpu_check, model = _gpu_check_fa4(package, monkeypatch, {})
    import flash_attn.cute.interface as interface

    exact, wrong = interface._flash_attn_fwd, fast.FA4_TILINGS[-1]

    def fwd(q, k, v, softmax_scale=None, **tiling):
        out, lse = exact(q, k, v, softmax_scale=softmax_scale, **tiling)
        return (2 * out if tiling == wrong else out), lse

    monkeypatch.setattr(interface, "_flash_attn_fwd", fwd)
    rank = {str(c): i for i, c in enumerate(reversed(fast.FA4_TILINGS))}  # later in the list: faster
    sizes = []
    real = fast.fa4_attention
    monkeypatch.setattr(fast, "fa4_attention", lambda q, *a: sizes.append(q.shape[-1]) or real(q, *a))
    monkeypatch.setattr(fast, "median_seconds",
                        lambda *a, **k: 1.0 + rank.get(str(fast.FA4_CONFIG.get(sizes[-1])), 99))
    check = gpu_check.Check(600, None)
    gpu_check.fa4_tilings_check(check, torch.device("cpu"), model, 2, 8)
    wrong_rows = [r for r in check.results["fa4_tilings"] if r["config"] == wrong]
    assert len(wrong_rows) == 2 and all(r["max_abs"] > 0.1 for r in wrong_rows)
    assert fast.FA4_CONFIG == {24: fast.FA4_TILINGS[-2], 32: fast.FA4_TILINGS[-2]}


def test_gpu_check_reports_the_median_whole_run(monkeypatch, tmp_path):
    """--repeats: every whole run's time is kept, the median reported; fewer than one is refused."""
    sys.path.insert(0, str(BENCHMARKS_DIR))
    import bench_sampling
    import gpu_check

    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--repeats", "0"])
    real, seconds = bench_sampling.time_sampling, iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(bench_sampling, "time_sampling",
                        lambda pipe, path, *a: dataclasses.replace(real(pipe, path, *a), seconds=next(seconds)))
    gpu_check.main(["--tiny", "--batch-sizes", "2", "--steps", "1", "--out", str(tmp_path), "--skip", "environment",
                    "bf16", "self-attention", "block matrix", "golden", "Triton", "FlashAttention-4", "one forward",
                    "host syncs", "profile", "variant", "plain path", "numerics", "short whole-run"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["fast_whole_run_seconds"] == [3.0, 1.0, 2.0]
    assert [r["seconds"] for r in report["runs"] if r["path"] == "fast"] == [2.0]


def test_gelu_epilogue_check_tells_tanh_from_erf(monkeypatch):
    """PyTorch's CPU _addmm_activation applies the erf GELU: the check must refuse it in float32 and in bf16
    (where the forms still differ by ~10 % at x = -3), and accept a tanh GELU."""
    monkeypatch.setattr(fast, "_EPILOGUE_IS_TANH", {})
    assert not fast.gelu_epilogue_is_tanh("cpu", torch.float32)
    assert not fast.gelu_epilogue_is_tanh("cpu", torch.bfloat16)

    def tanh_epilogue(bias, mat1, mat2, use_gelu=False):
        return torch.nn.functional.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")

    monkeypatch.setattr(fast, "_EPILOGUE_IS_TANH", {})
    monkeypatch.setattr(torch, "_addmm_activation", tanh_epilogue)
    assert fast.gelu_epilogue_is_tanh("cpu", torch.float32)
    assert fast.gelu_epilogue_is_tanh("cpu", torch.bfloat16)


def test_forward_matches_golden_c2i(pipe, load_golden):
    for case in load_golden("c2i_forward.pt").values():
        with torch.no_grad():
            out = denoiser(pipe.model, **ALL_CPU_SWITCHES)(case["hidden_states"], case["timestep"],
                                                            class_labels=case["class_labels"])
        assert max_abs(out, case["output"]) < 1e-5


@pytest.mark.parametrize("merge_qkv, fused_norms", [(False, False), (True, False), (True, True)])
def test_text_to_image_forward_equals_model_and_golden(t2i_model, load_golden, merge_qkv, fused_norms):
    case = load_golden("t2i_forward.pt")
    args = (case["hidden_states"], case["timestep"])
    kwargs = dict(encoder_hidden_states=case["encoder_hidden_states"],
                  encoder_attention_mask=case["encoder_attention_mask"])
    with torch.no_grad():
        expected = t2i_model(*args, **kwargs)
        out = denoiser(t2i_model, merge_qkv=merge_qkv, merge_adaln=True, fused_norms=fused_norms)(*args, **kwargs)
    assert max_abs(out, expected) < EXACT_ATOL
    assert max_abs(out, case["output"]) < 1e-5


def test_packed_inputs_go_to_the_plain_model(pipe, load_golden):
    case = load_golden("c2i_forward_packed.pt")
    grid_sizes = case["latent_size"].tolist()
    with torch.no_grad():
        out = denoiser(pipe.model, **ALL_CPU_SWITCHES)(case["hidden_states"], case["timestep"],
                                                        class_labels=case["class_labels"], grid_sizes=grid_sizes)
    assert max_abs(out, case["output"]) < 1e-5


def test_weights_follow_in_place_updates(make_tiny_model):
    model = make_tiny_model().eval()
    torch.nn.init.normal_(model.proj_out_2.weight, std=0.02)  # fresh models output exactly zero
    den = denoiser(model, merge_qkv=True, merge_adaln=True)
    x, t, labels = forward_inputs(batch=2, size=8)
    labels = labels % model.num_classes
    with torch.no_grad():
        before = den(x, t, class_labels=labels)
        for block in model.transformer_blocks:  # as an optimizer step or load_state_dict does: in place
            block.attn1.q_proj.weight.mul_(1.5)
            block.norm1.linear.weight.normal_(std=0.02)
        after = den(x, t, class_labels=labels)
        expected = model(x, t, class_labels=labels)
    assert max_abs(after, expected) < EXACT_ATOL
    assert max_abs(before, after) > 1e-4


def test_weights_copied_under_inference_mode_follow_later_updates(make_tiny_model):
    """Copies made in a first call under torch.inference_mode are written again by a later call outside it."""
    model = make_tiny_model().eval()
    torch.nn.init.normal_(model.proj_out_2.weight, std=0.02)
    den = denoiser(model, merge_qkv=True, merge_adaln=True)
    x, t, labels = forward_inputs(batch=2, size=8)
    labels = labels % model.num_classes
    with torch.inference_mode():
        den(x, t, class_labels=labels)
    with torch.no_grad():
        model.transformer_blocks[0].attn1.q_proj.weight.mul_(1.5)
        after = den(x, t, class_labels=labels)
        expected = model(x, t, class_labels=labels)
    assert max_abs(after, expected) < EXACT_ATOL


@pytest.mark.parametrize("change", ["assign", "dtype", "double"])
def test_weights_follow_replaced_parameters_and_leave_the_callers_tensors(make_tiny_model, change):
    """load_state_dict(assign=True) or .to(dtype) replaces parameters without moving their version counters:
    the fast path must use the new ones, and never write into the old ones (a caller's backup)."""
    model = make_tiny_model().eval()
    torch.nn.init.normal_(model.proj_out_2.weight, std=0.02)
    den = denoiser(model)  # nothing merged or cast: the copies are the parameters themselves
    x, t, labels = forward_inputs(batch=2, size=8)
    labels = labels % model.num_classes
    with torch.no_grad():
        den(x, t, class_labels=labels)
        backup = {k: v.clone() for k, v in model.state_dict().items()}
        held = model.state_dict()  # the caller's references to the old tensors
        if change == "assign":
            new = make_tiny_model(seed=1).state_dict()
            new["proj_out_2.weight"].normal_(std=0.02)
            model.load_state_dict(new, assign=True)
            model.transformer_blocks[0].attn1.q_proj.weight.mul_(1.5)  # and one in-place step after it
        elif change == "dtype":
            model.to(torch.bfloat16).float()
        else:
            model.double()
            x = x.double()
        out = den(x, t, class_labels=labels)
        expected = model(x, t, class_labels=labels)
    assert out.dtype == expected.dtype and max_abs(out, expected) < EXACT_ATOL
    assert all(torch.equal(held[k], backup[k]) for k in backup)


def test_refused_accelerate_changes_nothing(plain_pipe):
    with pytest.raises(ValueError, match="head_pad"):
        fast.accelerate(plain_pipe, precision="bf16", merge_qkv=True, head_pad=8)
    assert plain_pipe.autocast_dtype is None and plain_pipe.denoiser is plain_pipe.model


def test_fast_path_follows_the_pipelines_precision_and_model(plain_pipe):
    """pipe.autocast_dtype or pipe.model set after accelerate: the fast path is built again, not left stale."""
    kwargs = dict(class_labels=[3, 7], height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
                  output_type="pt")
    fast.accelerate(plain_pipe, precision="keep", merge_qkv=True, merge_adaln=True)
    plain_pipe.autocast_dtype = torch.bfloat16
    out = plain_pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert plain_pipe.denoiser.autocast_dtype == torch.bfloat16
    fast.plain(plain_pipe)
    expected = plain_pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert max_abs(out, expected) < 2e-2
    plain_pipe.autocast_dtype = None
    fast.accelerate(plain_pipe, precision="keep", merge_qkv=True)
    original, plain_pipe.model = plain_pipe.model, copy_with_noise(plain_pipe.model)
    try:
        out = plain_pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        assert plain_pipe.denoiser.model is plain_pipe.model
        fast.plain(plain_pipe)
        expected = plain_pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        assert max_abs(out, expected) < SAMPLING_ATOL
    finally:
        plain_pipe.model = plain_pipe.denoiser = original


def test_a_precision_given_to_accelerate_is_the_pipelines_and_stays(plain_pipe):
    """accelerate(precision="bf16") sets the pipeline's precision too; otherwise the pipeline's next call
    (fast.follow) would rebuild the fast path at the old precision and drop the switch."""
    fast.accelerate(plain_pipe, precision="bf16", merge_qkv=True)
    assert plain_pipe.autocast_dtype == torch.bfloat16
    plain_pipe(class_labels=[3], height=32, width=32, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert isinstance(plain_pipe.denoiser, fast.FastDenoiser) and plain_pipe.denoiser.autocast_dtype == torch.bfloat16


def copy_with_noise(model: torch.nn.Module) -> torch.nn.Module:
    import copy
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    return other


def test_bf16_fast_forward_equals_plain_bf16(pipe):
    x, t, labels = forward_inputs()
    den = fast.FastDenoiser(pipe.model, fast.FastOptions(precision="bf16", **ALL_CPU_SWITCHES).resolve("cpu"),
                            autocast_dtype=torch.bfloat16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = pipe.model(x, t, class_labels=labels)
        out = den(x, t, class_labels=labels)
        full = pipe.model(x, t, class_labels=labels)
    assert den._weights["blocks"][0]["qkv_w"].dtype == torch.bfloat16  # cast once, not per call
    assert out.dtype == expected.dtype == torch.bfloat16
    # Same weights, same autocast rules: equal up to bf16 rounding, and as far from float32 as the plain bf16 path.
    scale = full.abs().max().item()
    assert max_abs(out, expected) <= 1e-2 * scale
    assert max_abs(out, full) <= 2 * max_abs(expected, full) + 1e-3 * scale


# ---------------------------------------------------------------------------------------------- compile
def test_compiled_block_is_one_region_per_shape(make_tiny_model):
    """Regional compile: the blocks share one compiled graph per input shape, with no graph breaks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_tiny_model(depth=3).eval()
    torch.nn.init.normal_(model.proj_out_2.weight, std=0.02)
    den = denoiser(model, merge_qkv=True, merge_adaln=True, **EAGER_COMPILE)
    for size in (8, 16):
        x, t, labels = forward_inputs(batch=2, size=size)
        with torch.no_grad():
            out = den(x, t, class_labels=labels % model.num_classes)
            assert max_abs(out, model(x, t, class_labels=labels % model.num_classes)) < EXACT_ATOL
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_fused_residual_compiles_two_regions_per_shape(make_tiny_model):
    """With fused_residual the first block (nothing pending) and the others are two compiled regions per
    shape, each one graph, and the forward is the model's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_tiny_model(depth=3).eval()
    torch.nn.init.normal_(model.proj_out_2.weight, std=0.02)
    den = denoiser(model, merge_qkv=True, fused_norms=True, fused_residual=True, **EAGER_COMPILE)
    x, t, labels = forward_inputs(batch=2, size=16)
    with torch.no_grad():
        assert max_abs(den(x, t, class_labels=labels % model.num_classes),
                       model(x, t, class_labels=labels % model.num_classes)) < EXACT_ATOL
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert den.status()["compiled_shapes"] == 2 and den.status()["fused_residual"] is True


def test_compile_mode_only_from_min_tokens(make_tiny_model):
    """compile_mode_min_tokens: the small shape compiles in the default mode, the large in compile_mode."""
    modes = []

    def recording_backend(graph_module, example_inputs, mode=None):
        modes.append(mode)
        return graph_module.forward

    torch._dynamo.reset()
    model = make_tiny_model().eval()
    torch.nn.init.normal_(model.proj_out_2.weight, std=0.02)
    patches = lambda size: 2 * (size // model.patch_size) ** 2  # noqa: E731 - tokens of a batch of 2
    den = denoiser(model, merge_qkv=True, compile=True, compile_backend=recording_backend,
                   compile_mode="max-autotune-no-cudagraphs", compile_mode_min_tokens=patches(16))
    for size in (8, 16, 8):
        x, t, labels = forward_inputs(batch=2, size=size)
        with torch.no_grad():
            out = den(x, t, class_labels=labels % model.num_classes)
            assert max_abs(out, model(x, t, class_labels=labels % model.num_classes)) < EXACT_ATOL
    assert modes == [None, "max-autotune-no-cudagraphs"]
    status = den.status()
    assert (status["compiled_shapes"], status["compile_mode_shapes"]) == (2, 1), status
    # without the threshold every shape compiles in compile_mode
    torch._dynamo.reset()
    modes.clear()
    den = denoiser(model, merge_qkv=True, compile=True, compile_backend=recording_backend,
                   compile_mode="max-autotune-no-cudagraphs")
    for size in (8, 16):
        with torch.no_grad():
            den(*forward_inputs(batch=2, size=size)[:2], class_labels=torch.tensor([1, 2]))
    assert modes == ["max-autotune-no-cudagraphs"] * 2 and den.status()["compile_mode_shapes"] == 2


def test_dynamic_compile_serves_every_shape_with_one_graph(make_tiny_model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_tiny_model().eval()
    torch.nn.init.normal_(model.proj_out_2.weight, std=0.02)
    den = denoiser(model, merge_qkv=True, merge_adaln=True, compile_dynamic=True, **EAGER_COMPILE)
    for batch, size in ((2, 8), (3, 16), (4, 32)):
        x, t, labels = forward_inputs(batch=batch, size=size)
        with torch.no_grad():
            out = den(x, t, class_labels=labels % model.num_classes)
            assert max_abs(out, model(x, t, class_labels=labels % model.num_classes)) < EXACT_ATOL
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_dynamic_compile_serves_text_to_image(t2i_model, load_golden):
    """The text mask is batch-sized too: it must be marked dynamic with the rest, or no shape compiles."""
    torch._dynamo.reset()
    case = load_golden("t2i_forward.pt")
    den = denoiser(t2i_model, merge_qkv=True, merge_adaln=True, compile_dynamic=True, **EAGER_COMPILE)
    kwargs = dict(encoder_hidden_states=case["encoder_hidden_states"],
                  encoder_attention_mask=case["encoder_attention_mask"])
    with torch.no_grad():
        out = den(case["hidden_states"], case["timestep"], **kwargs)
        expected = t2i_model(case["hidden_states"], case["timestep"], **kwargs)
    assert max_abs(out, expected) < EXACT_ATOL
    status = den.status()
    assert status["compiled_shapes"] >= 1 and status["compile_fallbacks"] == 0, status


def test_compile_failure_falls_back_to_the_plain_block(pipe):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    den = denoiser(pipe.model, compile=True, compile_backend=broken_backend)
    x, t, labels = forward_inputs()
    with torch.no_grad(), pytest.warns(UserWarning, match="running this shape without compile"):
        out = den(x, t, class_labels=labels)
    with torch.no_grad():
        assert torch.equal(out, pipe.model(x, t, class_labels=labels))
    assert den.status()["compile_fallbacks"] == 1 and den.status()["compiled_shapes"] == 0


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name, switches", [
    ("euler_cfg", {**ALL_CPU_SWITCHES, **EAGER_COMPILE}),
    ("euler_shift", ALL_CPU_SWITCHES),
])
def test_fast_sampling_gives_the_plain_images(plain_pipe, load_golden, name, switches):
    """The issue's check: same noise, same images, fast path vs plain path (and vs the release)."""
    run = load_golden(f"pipeline_{name}.pt")
    kwargs = dict(class_labels=run["labels"], height=32, width=32, num_inference_steps=run["steps"],
                  guidance_scale=run["cfg"], shift=run["shift"], solver="euler", latents=run["initial_noise"],
                  stage_noise=run["block_noise"], output_type="pt")
    plain = plain_pipe(**kwargs)
    fast.accelerate(plain_pipe, **switches)
    assert isinstance(plain_pipe.denoiser, fast.FastDenoiser)
    images = plain_pipe(**kwargs)
    assert max_abs(images, plain) < EXACT_ATOL
    assert max_abs(images, run["samples"]) < SAMPLING_ATOL


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.slow  # inductor compiles C++ for the CPU: about a minute cold on 2 idle cores
def test_inductor_compiled_forward_equals_model(pipe):
    x, t, labels = forward_inputs()
    with torch.no_grad():
        expected = pipe.model(x, t, class_labels=labels)
        out = denoiser(pipe.model, compile=True, **ALL_CPU_SWITCHES)(x, t, class_labels=labels)
        assert max_abs(out, expected) < 1e-5
        # bf16: inductor may round at other points than eager autocast, but no further from float32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain_bf16 = pipe.model(x, t, class_labels=labels)
        options = fast.FastOptions(precision="bf16", compile=True, **ALL_CPU_SWITCHES).resolve("cpu")
        fast_bf16 = fast.FastDenoiser(pipe.model, options, autocast_dtype=torch.bfloat16)(x, t, class_labels=labels)
    assert rel_err(fast_bf16, expected) <= 1.5 * rel_err(plain_bf16, expected)
    assert rel_err(fast_bf16, plain_bf16) <= 2 * rel_err(plain_bf16, expected)


# ---------------------------------------------------------------------------------------------- benchmark
def test_flop_count_matches_the_issue():
    """430 TFLOPs per 256 px image: 2 x 30 x the four stages' forwards of XL."""
    sys.path.insert(0, str(BENCHMARKS_DIR))
    import bench_sampling

    with torch.device("meta"):
        model = bench_sampling.PixelFlowModel(**bench_sampling.XL_C2I_PARAMS)
    per_image = sum(2 * 30 * bench_sampling.forward_flops(model, 1, r, r) for r in (32, 64, 128, 256))
    assert per_image == pytest.approx(430e12, rel=0.01)
    weights = [1.0, 1.2333, 1.9333, 2.4]  # stage 0 is unguided: its null half is skipped
    assert bench_sampling.sampling_flops(model, 1, 256, [30] * 4, weights) == \
        pytest.approx(per_image - 30 * bench_sampling.forward_flops(model, 1, 32, 32))


def test_benchmark_runs_tiny(capsys):
    sys.path.insert(0, str(BENCHMARKS_DIR))
    import bench_sampling

    bench_sampling.main(["--tiny", "--steps", "1", "--forward-reps", "1", "--compare-plain"])
    out = capsys.readouterr().out
    assert "| fast | 2 |" in out and "| plain | 2 |" in out
    assert "max_uint8 0," in out


def test_gpu_check_keeps_the_fastest_variants_denoiser(monkeypatch):
    """The whole run with the fastest variant reuses the FastDenoiser its forward was compiled in (a max-autotune
    compile of the 256 px forward takes minutes on the GPU: compiling it twice ran a device check out of time)."""
    sys.path.insert(0, str(BENCHMARKS_DIR))
    import bench_sampling
    import gpu_check

    pipe = bench_sampling.make_pipeline(bench_sampling.build_model(bench_sampling.TINY_C2I_PARAMS, "cpu"), 32)
    times = iter([3.0, 1.0, 2.0])   # the second variant is the fastest, whatever this machine's timings
    monkeypatch.setattr(fast, "median_seconds", lambda *args, **kwargs: next(times))
    base = dict(merge_qkv=True, merge_adaln=True, compile=True, compile_backend="aot_eager")
    variants = [("default", base, 0), ("fused_norms", {**base, "fused_norms": True}, 0),
                ("no merge", {**base, "merge_adaln": False}, 0)]
    check = gpu_check.Check(600, None)
    switches, denoiser = gpu_check.forward_variants(check, pipe, 2, 32, 2.4, variants)
    assert switches == variants[1][1] and check.results["fastest_variant"] == "fused_norms"
    assert isinstance(denoiser, fast.FastDenoiser) and denoiser.options.fused_norms is True
    assert denoiser.options.merge_adaln is True
    assert denoiser.status()["compiled_shapes"] >= 1   # its forward is compiled already


@pytest.mark.slow  # ~35 s: the whole GPU check script, dry, so its one GPU run is not its first run
def test_gpu_check_dry_run_without_omegaconf(tmp_path):
    import json
    import subprocess

    result = subprocess.run(
        [sys.executable, str(BENCHMARKS_DIR / "gpu_check.py"), "--tiny", "--no-omegaconf", "--batch-sizes", "2",
         "--steps", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SECTION FAILED" not in result.stdout, result.stdout[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(v.startswith("ok") for v in report["sections"].values()), report["sections"]
    assert report["environment"]["omegaconf"] is False
    assert report["fast_vs_plain_images"]["max_uint8"] == 0
    assert len(report["forward_variants"]) == 9, result.stdout[-3000:]  # every variant ran
    assert {r["operation"] for r in report["norm_kernels"]} == {"RMSNorm + RoPE (q of a qkv projection)",
                                                                 "LayerNorm + modulation",
                                                                 "gated residual + LayerNorm + modulation"}
    assert "fa4_tilings" not in report  # FA4 does not import here: the section says so and times nothing
    assert all(v["max_abs_vs_default"] < 1e-5 for v in report["forward_variants"])
    # the whole run with the fastest variant reuses the FastDenoiser its 256 px forward was compiled in
    if report["fastest_variant"] != report["forward_variants"][0]["name"]:
        assert report["fastest_variant_run"]["compiled_shapes_before"] >= 1, report.get("fastest_variant_run")


def test_cuda_smoke_script_runs_on_the_cpu(tmp_path):
    """benchmarks/cuda_smoke.sh (train, resume and sample under torchrun; the GPU run's end-to-end check) with two
    CPU processes: it must pass here, so that it cannot rot between GPU sessions, and name what it checked."""
    import signal
    import subprocess

    env = {**os.environ, "NPROC": "2", "OUT": str(tmp_path), "PYTHON": sys.executable}
    # its own process group: on a timeout the torchrun workers are killed with it
    proc = subprocess.Popen(["bash", str(BENCHMARKS_DIR / "cuda_smoke.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("cuda_smoke.sh ran over 280 s:\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.rstrip().endswith("SMOKE PASS")
    check = (tmp_path / "smoke_check.log").read_text()
    assert "metrics rows at steps [10, 20, 30, 40, 50, 60]" in check and "max 0," in check  # fp32: identical
    assert {p.name for p in tmp_path.iterdir()} >= {"smoke_train.log", "smoke_resume.log", "smoke_sample_fast.log",
                                                    "smoke_sample_plain.log", "smoke_check.log"}


def test_cuda_smoke_script_fails_when_a_step_or_the_check_fails(tmp_path):
    """A stand-in interpreter answers the torchrun calls at once, failing or writing nothing: the script must end
    with SMOKE FAIL naming what failed, never SMOKE PASS."""
    import subprocess

    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nif [ "$1 $2" = "-m torch.distributed.run" ]; then echo "fake torchrun"; '
                    f'exit "$FAKE_RC"; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    for rc, expected in ((3, "SMOKE FAIL: train exited with 3"),
                         (0, "SMOKE FAIL: the outputs are not what the steps should have written")):
        env = {**os.environ, "NPROC": "2", "OUT": str(tmp_path / f"out{rc}"), "PYTHON": str(fake), "FAKE_RC": str(rc)}
        result = subprocess.run(["bash", str(BENCHMARKS_DIR / "cuda_smoke.sh")], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode != 0 and expected in result.stdout, result.stdout[-2000:]
        assert "SMOKE PASS" not in result.stdout
