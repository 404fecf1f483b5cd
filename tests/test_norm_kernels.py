"""The Triton normalisation kernels (pixelflow/norm_kernels.py), run on the CPU by Triton's interpreter.

TRITON_INTERPRET=1 has to be set before the kernels are defined, so each check runs in a fresh interpreter
process. On a GPU, benchmarks/gpu_check.py checks and times every launch config and compares the fast path
with and without them; the fast path itself uses them only after norm_kernels.works() on the device.

bf16 bounds are per element. The interpreter rounds float32 to bf16 by truncation (up to 2^-7 relative),
the reference by round-to-nearest (2^-8). Each bound is the sum of both roundings at every point where the
kernel and the reference round.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pixelflow import norm_kernels

REPO = Path(__file__).resolve().parent.parent


def run_interpreted(code: str) -> str:
    pytest.importorskip("triton")  # ships with PyTorch's Linux builds (CI has it); macOS and Windows wheels lack it
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    prelude = "import itertools\nimport torch\nfrom pixelflow import norm_kernels as nk\n" \
              "assert nk.INTERPRET and nk.available()\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_rms_rope_kernel_equals_the_reference():
    """Strided input (q and k as slices of one qkv projection), XL's head size 72 and a small one, float32 and
    bf16, the three forms (pairs, flat, partner), 1, 2 and 4 tokens per program over 45 and 105 tokens (the last program
    partly masked)."""
    out = run_interpreted("""
        import torch.nn.functional as F
        from pixelflow.model.embeddings import rope_2d
        torch.manual_seed(0)
        checked = 0
        for (heads, head_dim, grid), dtype, config in itertools.product(
                ((2, 72, 3), (3, 8, 5)), (torch.float32, torch.bfloat16),
                ((1, 4, "pairs"), (2, 4, "pairs"), (1, 4, "flat"), (4, 8, "flat"), (1, 4, "partner"),
                 (4, 8, "partner"))):
            nk.LAUNCH["rms_rope"] = config
            c = heads * head_dim
            rope = rope_2d(grid, grid + 2, head_dim)
            identity = torch.stack([torch.ones_like(rope[..., 0]), torch.zeros_like(rope[..., 1])], -1)
            n = grid * (grid + 2)
            qkv = (torch.randn(3, n, 3 * c) * 3).to(dtype)
            weight = torch.rand(c) + 0.5
            for x in (qkv[..., :c], qkv[..., c:2 * c]):
                assert x.stride(-1) == 1 and not x.is_contiguous()
                out = nk.rms_rope(x, weight, rope, heads, 1e-6)
                ref = nk.rms_rope_reference(x, weight, rope, heads, 1e-6).float()
                assert out.shape == (3, n, heads, head_dim) and out.dtype == dtype and out.is_contiguous()
                err = (out.float() - ref).abs()
                if dtype == torch.float32:
                    bound = torch.full_like(ref, 1e-5)
                else:  # the normalised pair's rounding enters both outputs, then each output's own
                    normed = F.rms_norm(x.float(), (c,), weight, 1e-6).unflatten(-1, (heads, head_dim // 2, 2))
                    pair = normed.abs().sum(-1, keepdim=True).expand_as(normed).flatten(-2)
                    bound = 2 ** -6 * (pair + ref.abs()) + 1e-6
                assert (err <= bound).all(), (heads, head_dim, dtype, config, (err - bound).max().item())
                # not trivially: without the rotation the same output is far outside the bound
                unrotated = nk.rms_rope_reference(x, weight, identity, heads, 1e-6).float()
                assert ((out.float() - unrotated).abs() > bound).any()
                checked += 1
        print("checked", checked)
    """)
    assert "checked 48" in out


def test_padded_rms_rope_kernel_writes_each_head_padded_with_zeros():
    """rms_rope_padded: the unpadded kernel's output in each head's first d channels (up to the order of a
    token's sum of squares) and exact zeros after them, at XL's head size 72 padded to 80 and at a small one
    padded to twice its size, float32 and bf16, 1 and 2 tokens per program over 45 tokens (the last program
    partly masked); every LAUNCH form gives the same (the padded kernel is always the "pairs" form). Odd or too
    small sizes are refused."""
    out = run_interpreted("""
        from pixelflow.model.embeddings import rope_2d
        torch.manual_seed(0)
        checked = 0
        for (heads, head_dim, size), dtype, config in itertools.product(
                ((2, 72, 80), (3, 8, 16)), (torch.float32, torch.bfloat16),
                ((1, 4, "pairs"), (2, 4, "pairs"), (1, 4, "flat"))):
            nk.LAUNCH["rms_rope"] = (config[0], config[1], "pairs")
            c = heads * head_dim
            rope = rope_2d(5, 9, head_dim)
            qkv = (torch.randn(3, 45, 3 * c) * 3).to(dtype)
            weight = torch.rand(c) + 0.5
            for x in (qkv[..., :c], qkv[..., c:2 * c]):
                unpadded = nk.rms_rope(x, weight, rope, heads, 1e-6)
                nk.LAUNCH["rms_rope"] = config
                out = nk.rms_rope_padded(x, weight, rope, heads, 1e-6, size)
                assert out.shape == (3, 45, heads, size) and out.dtype == dtype and out.is_contiguous()
                # the same values; a token's sum of squares runs in another lane order, so the last bit of
                # its scale may differ, and in bf16 a rounding may then go the other way (one ulp, 2^-7)
                bound = 1e-5 if dtype == torch.float32 else 2 ** -7 * unpadded.float().abs() + 1e-6
                err = (out[..., :head_dim].float() - unpadded.float()).abs()
                assert (err <= bound).all(), (heads, head_dim, size, dtype, config, err.max().item())
                assert torch.all(out[..., head_dim:] == 0)
                ref = nk.rms_rope_padded_reference(x, weight, rope, heads, 1e-6, size)
                assert ref.shape == out.shape and torch.all(ref[..., head_dim:] == 0)
                nk.LAUNCH["rms_rope"] = (config[0], config[1], "pairs")
                checked += 1
        for size in (6, 81, True):
            try:
                nk.rms_rope_padded(qkv[..., :c], weight, rope, heads, 1e-6, size)
            except ValueError as e:
                assert "even size >= the head size 8" in str(e), e
                checked += 1
        print("checked", checked)
    """)
    assert "checked 27" in out


def test_layer_norm_modulate_kernel_equals_the_reference():
    """Shift and scale as strided views of the (B, 6, D) modulation tensor, as the block passes them; 3 images
    of 5 tokens (a program's tokens can span two images: the "shared" form loads per token there) and of 4
    (with 2 tokens per program, each program's tokens are of one image, which loads its shift and scale once
    in the "shared" form). Each case also through add_layer_norm_modulate (the same kernel, residual first)."""
    out = run_interpreted("""
        torch.manual_seed(0)
        checked = 0
        for dim, dtype, seq, config in itertools.product((40, 1152), (torch.float32, torch.bfloat16), (5, 4),
                                                         nk.CONFIGS["layer_norm_modulate"][::2]):
            nk.LAUNCH["layer_norm_modulate"] = config
            shift = torch.randn(3, 6, dim)[:, 0]  # a view of the modulation tensor, and a contiguous scale
            scale = torch.randn(3, dim)
            x = (torch.randn(3, seq, dim) * 4 + 2).to(dtype)
            out = nk.layer_norm_modulate(x, shift, scale, 1e-6)
            ref = nk.layer_norm_modulate_reference(x, shift, scale, 1e-6).float()
            assert out.shape == x.shape and out.dtype == dtype
            err = (out.float() - ref).abs()
            bound = 1e-5 if dtype == torch.float32 else 2 ** -6 * ref.abs() + 1e-4
            assert (err <= bound).all(), (dim, dtype, config, (err - bound).max().item())
            # not trivially: the modulation matters
            plain = nk.layer_norm_modulate_reference(x, torch.zeros_like(shift), torch.zeros_like(scale), 1e-6)
            assert ((out.float() - plain.float()).abs() > bound).any()

            # With the residual first, x, y and gate each with its own strides (x a token slice, y a channel
            # slice, gate a strided view): the sum rounds exactly as the model's
            # x + (y * gate).to(dtype), the interpreter's rounding being truncation (bf16(t) below), and the
            # normalised output is layer_norm_modulate of that sum.
            nk.LAUNCH["add_layer_norm_modulate"] = config
            gate = torch.randn(3, 2, dim)[:, 1]  # strides unlike shift's and scale's
            xs = (torch.randn(3, seq + 2, dim) * 4 + 2).to(dtype)[:, 1:-1]
            y = (torch.randn(3, seq, dim + 8) * 3).to(dtype)[..., 4:-4]
            total, out = nk.add_layer_norm_modulate(xs, y, gate, shift, scale, 1e-6)
            assert total.shape == out.shape == xs.shape and total.dtype == out.dtype == dtype
            assert total.is_contiguous() and out.is_contiguous()
            if dtype == torch.float32:
                expected = xs + y * gate[:, None]
            else:
                bf16 = lambda t: (t.view(torch.int32) & -65536).view(torch.float32)  # noqa: E731 - truncate
                expected = bf16(xs.float() + bf16(y.float() * gate[:, None]))
            assert torch.equal(total.float(), expected.float()), (dim, dtype, config)
            ref = nk.layer_norm_modulate_reference(total, shift, scale, 1e-6).float()
            bound = 1e-5 if dtype == torch.float32 else 2 ** -6 * ref.abs() + 1e-4
            assert ((out.float() - ref).abs() <= bound).all(), (dim, dtype, config, "add")
            checked += 1
        print("checked", checked)
    """)
    assert "checked 40" in out


def test_fast_forwards_with_the_kernels_equal_the_models():
    """Whole FastDenoiser forwards with the kernels inside (both counted) against the golden tiny models in
    float32: class-to-image, and text-to-image, where the cross-attention queries go through rms_rope too;
    with fused_residual (every block after the first, and the final layer, add the residual in the LayerNorm
    kernel), and class-to-image without it; then both at a padded head size (head_pad)."""
    out = run_interpreted("""
        from pixelflow import fast
        from pixelflow.checkpoint import load_pretrained
        launches = {"_rms_rope_kernel": 0, "_layer_norm_modulate_kernel": 0, "_rms_rope_padded_kernel": 0}
        for name in launches:
            kernel = getattr(nk, name)
            class Counting:
                def __getitem__(self, grid, kernel=kernel, name=name):
                    launches[name] += 1
                    return kernel[grid]
            setattr(nk, name, Counting())
        c2i, _ = load_pretrained("tests/golden/c2i_ckpt", device="cpu")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 16, 16, generator=gen)
        t2i, _ = load_pretrained("tests/golden/t2i_ckpt", device="cpu")
        case = torch.load("tests/golden/t2i_forward.pt", weights_only=True)
        calls = [(c2i, (x, torch.tensor([10.0, 800.0])), dict(class_labels=torch.tensor([3, 1000]))),
                 (t2i, (case["hidden_states"], case["timestep"]),
                  dict(encoder_hidden_states=case["encoder_hidden_states"],
                       encoder_attention_mask=case["encoder_attention_mask"]))]

        def forward(model, args, kwargs, **switches):  # against the model's; the denoiser and its launches
            options = fast.FastOptions(merge_adaln=True, attention="default", fused_norms=True,
                                       **switches).resolve("cpu")
            den = fast.FastDenoiser(model, options)  # checks the kernels at the model's widths (works())
            assert den.status()["fused_norms"] is True
            before = dict(launches)
            with torch.no_grad():
                expected = model(*args, **kwargs)
                out = den(*args, **kwargs)
            err = (out - expected).abs().max().item()
            assert err < 1e-5, err
            print("max abs", err)
            return den, {name: launches[name] - before[name] for name in launches}

        for (model, args, kwargs), residual in zip(calls[:1] + calls, (False, True, True)):
            den, counts = forward(model, args, kwargs, merge_qkv=True, fused_residual=residual)
            assert den.status()["fused_residual"] is residual
            depth = len(model.transformer_blocks)
            cross = hasattr(model.transformer_blocks[0], "attn2")
            assert counts["_rms_rope_kernel"] == depth * (3 if cross else 2)
            assert counts["_layer_norm_modulate_kernel"] == depth + residual
        # Padded heads (head_pad): q and k come out of the padded kernel, v out of zero rows of its projection,
        # merged or not; the cross-attention queries stay unpadded.
        for (model, args, kwargs), merge in zip(calls, (True, False)):
            size = model.attention_head_dim + 8
            den, counts = forward(model, args, kwargs, merge_qkv=merge, fused_residual=True, head_pad=size)
            assert den.head_sizes == (size,)  # works() checked the padded kernel at this size too
            depth = len(model.transformer_blocks)
            cross = hasattr(model.transformer_blocks[0], "attn2")
            assert counts["_rms_rope_padded_kernel"] == 2 * depth
            assert counts["_rms_rope_kernel"] == (depth if cross else 0)
    """)
    assert out.count("max abs") == 5


def test_kernels_that_do_not_compile_are_refused_before_any_forward():
    """works() runs both kernels at a model's widths: a launch config Triton cannot compile (3 tokens per
    program: block sizes must be powers of two) makes it False, and the fast path then warns, turns
    fused_norms off (and fused_residual, whose kernel is checked on its own) and computes the same forward
    without them."""
    out = run_interpreted("""
        import warnings
        from pixelflow import fast
        from pixelflow.checkpoint import load_pretrained
        assert nk.works("cpu", torch.bfloat16, hidden=40, heads=2, head_dim=8)
        nk.LAUNCH["rms_rope"] = (3, 4, "pairs")
        nk.LAUNCH["add_layer_norm_modulate"] = (3, 4, "per-token")
        assert not nk.works("cpu", torch.bfloat16, hidden=40, heads=2, head_dim=8)
        assert not nk.works("cpu", torch.bfloat16, hidden=40, heads=2, head_dim=8, ops=("add_layer_norm_modulate",))
        assert nk.works("cpu", torch.bfloat16, hidden=40, heads=2, head_dim=8, ops=("layer_norm_modulate",))
        model, _ = load_pretrained("tests/golden/c2i_ckpt", device="cpu")
        options = fast.FastOptions(merge_qkv=True, attention="default", fused_norms=True).resolve("cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            den = fast.FastDenoiser(model, options)
        messages = [str(w.message) for w in caught]
        assert any("fused_norms is off" in m for m in messages) and any("fused_residual is off" in m
                                                                          for m in messages), messages
        assert den.status()["fused_norms"] is False and den.status()["fused_residual"] is False
        x = torch.randn(2, 3, 16, 16)
        t, labels = torch.tensor([10.0, 800.0]), torch.tensor([3, 1000])
        with torch.no_grad():
            err = (den(x, t, class_labels=labels) - model(x, t, class_labels=labels)).abs().max().item()
        assert err < 1e-5, err
        print("ok")
    """)
    assert "ok" in out


def test_a_padded_size_the_kernel_fails_at_is_not_tried():
    """If rms_rope_padded fails its check at one head size: with head_pad "auto" that size is dropped from the
    attention candidates (the other kernels stay on); with that size asked for, fused_norms is off. Either way
    the forward is the model's."""
    out = run_interpreted("""
        import dataclasses
        import warnings
        from pixelflow import fast
        from pixelflow.checkpoint import load_pretrained
        model, _ = load_pretrained("tests/golden/c2i_ckpt", device="cpu")
        d = model.attention_head_dim
        bad = -(-d // 32) * 32 if d % 32 else d + 32  # a padded size "auto" tries
        real = nk.rms_rope_padded
        def failing(x, weight, rope, heads, eps, size):
            if size == bad:
                raise RuntimeError("no kernel at this size")
            return real(x, weight, rope, heads, eps, size)
        nk.rms_rope_padded = failing
        x = torch.randn(2, 3, 16, 16)
        t, labels = torch.tensor([10.0, 800.0]), torch.tensor([3, 1000])
        for head_pad in ("auto", bad):
            options = fast.FastOptions(merge_qkv=True, attention="default", fused_norms=True).resolve("cpu")
            options = dataclasses.replace(options, head_pad=head_pad)  # "auto" as on CUDA
            sizes = fast.head_sizes(d, head_pad)
            assert bad in sizes, (sizes, bad)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                den = fast.FastDenoiser(model, options)
            messages = [str(w.message) for w in caught]
            if head_pad == "auto":
                assert den.status()["fused_norms"] is True and den.head_sizes == tuple(s for s in sizes if s != bad)
                assert any(f"at head sizes [{bad}]" in m for m in messages), messages
            else:
                assert den.status()["fused_norms"] is False and den.head_sizes == (bad,)
                assert any(f"padded to head size {bad}): fused_norms is off" in m for m in messages), messages
            with torch.no_grad():
                err = (den(x, t, class_labels=labels) - model(x, t, class_labels=labels)).abs().max().item()
            assert err < 1e-5, err
            print("ok", head_pad)
    """)
    assert "ok auto" in out and out.count("ok") == 2


def test_works_checks_the_padded_kernel_at_each_pad_size(monkeypatch):
    """works(pads=...) runs rms_rope_padded at each size (and caches per size): a padded kernel with wrong
    values fails it, while the unpadded check, and a check without rms_rope, still pass."""
    pytest.importorskip("triton")
    monkeypatch.setattr(norm_kernels, "_WORKS", {})
    real = norm_kernels.rms_rope_padded_reference
    monkeypatch.setattr(norm_kernels, "rms_rope_padded", lambda *args: real(*args) + 1)  # wrong values
    args = ("cpu", torch.float32, 64, 4, 16)
    assert norm_kernels.works(*args)
    assert not norm_kernels.works(*args, pads=(24,))
    assert norm_kernels.works(*args, ops=("layer_norm_modulate",), pads=(24,))


def test_padded_rms_rope_loads_nothing_for_the_pads():
    """The pad positions read neither the RoPE table nor the weight: with NaN right after both (the last
    token's pad lanes would index past the table), the pads are still exact zeros."""
    out = run_interpreted("""
        from pixelflow.model.embeddings import rope_2d
        torch.manual_seed(0)
        heads, head_dim, size = 2, 8, 16
        c = heads * head_dim
        table = rope_2d(3, 5, head_dim)
        memory = torch.full((2 * table.numel(),), float("nan"))
        memory[:table.numel()] = table.flatten()
        rope = memory[:table.numel()].view(table.shape)      # NaN right after the table
        memory = torch.full((2 * c,), float("nan"))
        memory[:c] = torch.rand(c) + 0.5
        weight = memory[:c]                                  # and after the weight
        x = torch.randn(2, 15, c)
        out = nk.rms_rope_padded(x, weight, rope, heads, 1e-6, size)
        ref = nk.rms_rope_padded_reference(x, weight, rope, heads, 1e-6, size)
        assert torch.all(out[..., head_dim:] == 0), out[..., head_dim:].abs().max()
        assert (out - ref).abs().max().item() < 1e-5
        print("ok")
    """)
    assert "ok" in out


def test_bad_shapes_are_named_before_any_launch():
    x = torch.zeros(2, 12, 16)
    rope = torch.zeros(12, 8, 2)
    with pytest.raises(ValueError, match=r"rope \(12, 8, 2\); got weight \(16,\), rope \(10, 8, 2\)"):
        norm_kernels.rms_rope(x, torch.ones(16), torch.zeros(10, 8, 2), 2, 1e-6)
    with pytest.raises(ValueError, match="d even"):
        norm_kernels.rms_rope(x, torch.ones(16), rope, 16, 1e-6)
    with pytest.raises(ValueError, match=r"shift, scale \(B, D\); got x \(2, 12, 16\), shift \(1, 16\)"):
        norm_kernels.layer_norm_modulate(x, torch.zeros(1, 16), torch.zeros(1, 16), 1e-6)
    with pytest.raises(ValueError, match=r"add_layer_norm_modulate needs .* gate \(2, 15\)"):
        norm_kernels.add_layer_norm_modulate(x, x, torch.zeros(2, 15), torch.zeros(2, 16), torch.zeros(2, 16), 1e-6)
    with pytest.raises(ValueError, match=r"y shaped like x \(2, 12, 16\), got \(2, 11, 16\)"):
        norm_kernels.add_layer_norm_modulate(x, x[:, 1:], *torch.zeros(3, 2, 16), 1e-6)
    assert norm_kernels.rms_rope(x, torch.ones(16), rope, 2, 1e-6).shape == (2, 12, 2, 8)


@pytest.mark.parametrize("config", [(1, 4), [1, 4, "flat"], (1, 4, "zigzag"), (0, 4, "flat")])
def test_bad_launch_configs_are_named(monkeypatch, config):
    monkeypatch.setitem(norm_kernels.LAUNCH, "rms_rope", config)
    with pytest.raises(ValueError, match=r"LAUNCH\['rms_rope'\] = .*expected None or \(tokens per program"):
        norm_kernels._config("rms_rope", 1024)


def test_every_launch_config_compiles_for_an_h100():
    """The interpreter runs the kernels' arithmetic, not the GPU compiler: here every config of CONFIGS goes
    through Triton's sm_90 compiler (to PTX and cubin, no GPU needed), as the fast path's would on an H100."""
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "norm_kernels_sm90.py")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.split(" |")[0][2:] in norm_kernels.CONFIGS]
    assert len(rows) == sum(len(c) for c in norm_kernels.CONFIGS.values()), result.stdout
