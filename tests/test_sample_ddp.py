"""sample_ddp.py: layout-independent images, the .npz, resuming after a kill, clear errors, text-to-image.

All on the CPU with the tiny golden checkpoints (32 px, 4 stages) and 2 Euler steps per stage.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelflow import sampling

REPO = Path(__file__).resolve().parents[1]

C2I = REPO / "tests" / "golden" / "c2i_ckpt"
T2I = REPO / "tests" / "golden" / "t2i_ckpt"
# Tiny networks: one thread each, in this process (conftest's fixture) and in the subprocesses (OMP_NUM_THREADS).
pytestmark = pytest.mark.usefixtures("single_threaded_torch")
FAST = ["--num-steps-per-stage", "2", "--device", "cpu", "--no-progress"]


def _load_script():
    spec = importlib.util.spec_from_file_location("sample_ddp_script", REPO / "sample_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample_ddp = _load_script()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _args(sample_dir: Path, n: int, batch: int, *extra: str, pretrained: Path = C2I) -> list[str]:
    return ["--pretrained", str(pretrained), "--sample-dir", str(sample_dir), "--num-fid-samples", str(n),
            "--local-batch-size", str(batch), *FAST, *extra]


# ------------------------------------------------------------------------------------------ layout (no model)
def test_labels_are_balanced_like_the_release():
    labels = sampling.class_labels(range(50_000), 1000)
    assert labels[:3] == [0, 1, 2] and labels[1000] == 0 and labels[-1] == 999
    assert set(Counter(labels).values()) == {50}
    assert len(Counter(labels)) == 1000


@pytest.mark.parametrize("n,batch,world", [(12, 4, 2), (13, 5, 3), (50_000, 16, 8), (3, 16, 4)])
def test_every_index_belongs_to_exactly_one_rank(n, batch, world):
    seen = [i for r in range(world) for chunk in sampling.chunks_for_rank(n, batch, r, world) for i in chunk]
    assert sorted(seen) == list(range(n))
    # chunks are fixed index ranges: the same for every world size (what dopri5 needs)
    chunks = sorted((c.start, c.stop) for r in range(world) for c in sampling.chunks_for_rank(n, batch, r, world))
    assert chunks == sorted((c.start, c.stop) for c in sampling.chunks_for_rank(n, batch, 0, 1))


def test_image_noise_depends_on_seed_and_index_only():
    a = [g.initial_seed() for g in sampling.image_generators(10, [0, 1, 2, 7], "cpu")]
    b = [g.initial_seed() for g in sampling.image_generators(10, [7], "cpu")]
    assert a[3] == b[0] and len(set(a)) == 4
    assert sampling.image_seed(10, 3) != sampling.image_seed(11, 3)
    assert sampling.image_seed(10, 3) != sampling.image_seed(3, 10)


def test_default_sample_dir_names_the_settings(tmp_path):
    ckpt = tmp_path / "run1" / "checkpoints" / "0000200"
    ckpt.mkdir(parents=True)
    d = sampling.default_sample_dir(ckpt, 2.4, "euler", [10, 10, 20, 30], 10)
    assert d == Path("samples/run1-0000200-cfg2.4-steps10_10_20_30-seed10")
    d = sampling.default_sample_dir(C2I, 1.5, "euler", [30] * 4, 0, shift=3.0)
    assert d.name == "c2i_ckpt-cfg1.5-steps30-shift3-seed0"
    assert sampling.npz_path(d).name == "c2i_ckpt-cfg1.5-steps30-shift3-seed0.npz"


def test_npz_holds_the_pngs_in_index_order(tmp_path):
    folder = tmp_path / "samples"
    for i in range(3):
        pixels = np.zeros((4, 6, 3), dtype=np.uint8)
        pixels[..., 0], pixels[0, 0] = 40 * i + 1, (i, 255 - i, 7)
        sampling.write_png(sampling.png_path(folder, i), pixels)
    out = sampling.write_npz(folder, 3, 4, 6)
    assert out == tmp_path / "samples.npz"
    with np.load(out) as npz:
        arr = npz["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 4, 6, 3)
    for i in range(3):
        assert np.array_equal(arr[i], sampling.read_png(sampling.png_path(folder, i)))
    assert arr[:, 1, 1, 0].tolist() == [1, 41, 81]


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """12 images from a one-process run with batch 5 (in this process)."""
    folder = tmp_path_factory.mktemp("single") / "samples"
    sample_ddp.main(_args(folder, 12, 5))
    return folder


def test_torchrun_matches_one_process(reference, tmp_path):
    folder = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(REPO / "sample_ddp.py"), *_args(folder, 12, 4)]
    result = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr

    single = _pngs(reference)
    assert len(single) == 12 and _pngs(folder) == single  # byte-identical whatever the layout

    with np.load(sampling.npz_path(folder)) as npz:
        assert list(npz.keys()) == ["arr_0"]
        arr = npz["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (12, 32, 32, 3)
    for i in range(12):
        assert np.array_equal(arr[i], sampling.read_png(sampling.png_path(folder, i)))
    with np.load(sampling.npz_path(reference)) as npz:
        assert np.array_equal(npz["arr_0"], arr)
    assert len({arr[i].tobytes() for i in range(12)}) == 12  # distinct noise per image

    settings = json.loads((folder / sampling.SETTINGS_FILE).read_text())
    assert settings["settings"]["num_steps_per_stage"] == [2, 2, 2, 2]
    assert settings["run"]["world_size"] == 2


def test_resume_after_kill_keeps_finished_images(tmp_path):
    n = 24
    full = tmp_path / "full"
    sample_ddp.main(_args(full, n, 8))

    folder = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "sample_ddp.py"), *_args(folder, n, 1)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(list(folder.glob("*.png"))) < 4:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no images appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)  # freeze it first so it cannot finish before the kill lands
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = sorted(folder.glob("*.png"))
    assert 4 <= len(finished) < n and not sampling.npz_path(folder).exists()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished}

    # A torn image and a temporary file left by a crash: the first is remade, the second removed.
    broken = folder / "000023.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    stale = folder / ".000022.png.abc123.tmp"
    stale.write_bytes(b"partial")

    time.sleep(0.02)  # so that a rewrite would show in the mtimes
    sample_ddp.main(_args(folder, n, 3))  # resume with another batch size (Euler: allowed)
    for name, (data, mtime) in before.items():
        p = folder / name
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, name
    assert not stale.exists()
    assert _pngs(folder) == _pngs(full)
    with np.load(sampling.npz_path(folder)) as a, np.load(sampling.npz_path(full)) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_resume_refuses_other_settings(reference, capsys):
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(reference, 12, 5, "--cfg", "1.5"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "cfg" in err and "1.5" in err


@pytest.mark.parametrize("extra, key", [
    (["--shift", "2"], "shift"), (["--guidance-schedule", "constant"], "guidance_schedule"),
    (["--global-seed", "3"], "global_seed"), (["--num-steps-per-stage", "3"], "num_steps_per_stage"),
])
def test_resume_refuses_any_setting_that_changes_the_pixels(reference, capsys, extra, key):
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(reference, 12, 5, *extra))  # a flag given again: the last one counts
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "other settings" in err and key in err


def test_pending_batches_resample_partial_chunks_whole():
    chunks = sampling.chunks_for_rank(10, 4, 0, 1)  # [0..3] [4..7] [8, 9]
    done = {0, 2, 3, 4, 5, 6, 7}.__contains__
    # the short last chunk is sampled as a full batch, so its images do not depend on N
    assert sampling.pending_batches(chunks, done, 4) == [([0, 1, 2, 3], [1]), ([8, 9, 10, 11], [8, 9])]


def test_dopri5_resume_resamples_whole_batches(tmp_path):
    # dopri5 takes ~100 network calls per stage on random weights: a 16 px copy of the checkpoint keeps it quick
    ckpt = tmp_path / "c2i_16px"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes((C2I / "model.pt").read_bytes())
    (ckpt / "config.yaml").write_text((C2I / "config.yaml").read_text().replace("resolution: 32", "resolution: 16"))
    folder = tmp_path / "dopri5"
    args = _args(folder, 2, 2, "--use-ode-dopri5", "--cfg", "0", pretrained=ckpt)
    sample_ddp.main(args)
    first = _pngs(folder)
    assert len(first) == 2
    (folder / "000001.png").unlink()
    sample_ddp.main(args)
    assert _pngs(folder) == first  # image 1 was remade in its original batch {0, 1}, so it is the same
    with pytest.raises(SystemExit):  # the batch size is part of a dopri5 folder's settings
        sample_ddp.main(_args(folder, 2, 1, "--use-ode-dopri5", "--cfg", "0", pretrained=ckpt))


def test_dopri5_images_do_not_depend_on_the_number_of_samples(tmp_path, capsys):
    # The short last batch used to hold only the images below N, so with dopri5 (one step size per batch) a
    # folder extended from N = 3 to 4 kept images that a fresh N = 4 run makes otherwise.
    ckpt = tmp_path / "c2i_16px"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes((C2I / "model.pt").read_bytes())
    (ckpt / "config.yaml").write_text((C2I / "config.yaml").read_text().replace("resolution: 32", "resolution: 16"))
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    sample_ddp.main(_args(extended, 3, 2, "--use-ode-dopri5", "--cfg", "0", pretrained=ckpt))
    sample_ddp.main(_args(extended, 4, 2, "--use-ode-dopri5", "--cfg", "0", pretrained=ckpt))
    sample_ddp.main(_args(fresh, 4, 2, "--use-ode-dopri5", "--cfg", "0", pretrained=ckpt))
    assert len(_pngs(fresh)) == 4 and _pngs(extended) == _pngs(fresh)
    # A dopri5 folder written before batches were always full (no such setting) is refused, not mixed.
    record = json.loads((fresh / sampling.SETTINGS_FILE).read_text())
    record["settings"].pop("dopri5_batches")
    (fresh / sampling.SETTINGS_FILE).write_text(json.dumps(record))
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(fresh, 5, 2, "--use-ode-dopri5", "--cfg", "0", pretrained=ckpt))
    assert e.value.code == 2 and "dopri5_batches" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("extra,needle", [
    (["--num-fid-samples", "0"], "--num-fid-samples must be >= 1, got 0"),
    (["--num-classes", "10"], "--num-classes 10 disagrees"),
    (["--num-steps-per-stage", "0"], "got [0]"),
    (["--num-steps-per-stage", "2", "2"], "--num-steps-per-stage takes one step count (used at every stage) or one per "
                                          "stage (4 stages), got 2 values"),
    (["--local-batch-size", "0"], "--local-batch-size must be >= 1, got 0"),
    (["--cfg", "-1"], "--cfg must be a finite number >= 0"),
    (["--prompts", str(REPO / "tests" / "golden" / "README.md")], "class-to-image checkpoint"),
    (["--num-fid-samples", "4", "--shift", "0"], "--shift must be > 0"),
    (["--device", "foo"], "--device 'foo' is not a device; expected cpu, cuda or cuda:N"),
])
def test_bad_values_stop_before_any_work(tmp_path, capsys, extra, needle):
    folder = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        sample_ddp.main([*_args(folder, 4, 2), *extra])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not folder.exists()


def test_a_checkpoint_resolution_the_cascade_cannot_reach_stops_before_any_work(tmp_path, capsys):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(C2I, ckpt)
    config = (ckpt / "config.yaml").read_text()
    resolution = sampling.summarize_config(sampling.load_config(C2I)).resolution
    (ckpt / "config.yaml").write_text(config.replace(f"resolution: {resolution}", f"resolution: {resolution + 2}"))
    folder = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(folder, 2, 2, pretrained=ckpt))
    assert e.value.code == 2
    assert f"data.resolution={resolution + 2} must be a positive multiple of" in capsys.readouterr().err
    assert not folder.exists()


@pytest.mark.parametrize("resolution,shown", [("256.7", "256.7"), ("abc", "'abc'")])
def test_a_checkpoint_resolution_that_is_no_whole_number_is_named(tmp_path, capsys, resolution, shown):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(C2I, ckpt)
    config = sampling.load_config(C2I)
    text = (ckpt / "config.yaml").read_text()
    text = text.replace(f"resolution: {config.data.resolution}", f"resolution: {resolution}")
    (ckpt / "config.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(tmp_path / "never", 2, 2, pretrained=ckpt))
    assert e.value.code == 2
    assert f"config.yaml: data.resolution={shown} in the config must be an int" in capsys.readouterr().err


@pytest.mark.parametrize("solver", [[], ["--use-ode-dopri5"]], ids=["euler", "dopri5"])
def test_nan_samples_stop_with_a_plain_error_and_no_npz(tmp_path, solver):
    """NaN would pass the clamp and be written as black pixels; sample_ddp says so instead, without a traceback."""
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(C2I, ckpt)
    state = torch.load(ckpt / "model.pt", weights_only=True)
    state["proj_out_2.bias"][0] = float("nan")
    torch.save(state, ckpt / "model.pt")
    folder = tmp_path / "samples"
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(folder, 2, 2, *solver, pretrained=ckpt))
    assert "NaN or infinite" in str(e.value.code)
    assert not (tmp_path / "samples.npz").exists() and not list(folder.glob("*.png"))


def test_a_sample_folder_that_cannot_be_made_is_named(tmp_path, monkeypatch):
    """os.access passes for root on a read-only file system: the mkdir's own error is said plainly."""
    import errno
    import pathlib

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    folder = tmp_path / "ro" / "samples"
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(folder, 4, 2))
    assert f"--sample-dir {str(folder)!r} cannot be made: Read-only file system" in str(e.value.code)


def test_missing_checkpoint_and_misspelled_flag(tmp_path, capsys):
    missing = tmp_path / "no_such_ckpt"
    with pytest.raises(SystemExit):
        sample_ddp.main(_args(tmp_path / "s", 4, 2, pretrained=missing))
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_ddp.main([*_args(tmp_path / "s", 4, 2), "--num-fid-sample", "4"])
    assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--num-fid-samples must be >= 1, got -3"):
        sampling.plan_sampling(sampling.SampleOptions(pretrained=str(C2I), num_fid_samples=-3))


def test_unreadable_weights_leave_nothing_a_fixed_rerun_must_match(tmp_path, capsys):
    """A truncated model.pt is named in the error and records no settings; once fixed, the run works, and a
    touched (or copied) weights file still resumes the folder."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text((C2I / "config.yaml").read_text())
    good = (C2I / "model.pt").read_bytes()
    (ckpt / "model.pt").write_bytes(good[: len(good) // 2])
    folder = tmp_path / "samples"
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(folder, 3, 2, pretrained=ckpt))
    assert "could not read the weights file" in str(e.value.code) and "model.pt" in str(e.value.code)
    assert not (folder / sampling.SETTINGS_FILE).exists()

    (ckpt / "model.pt").write_bytes(good)
    sample_ddp.main(_args(folder, 2, 2, pretrained=ckpt))
    first = _pngs(folder)
    os.utime(ckpt / "model.pt", ns=(1, 1))  # as `touch` or a copy without timestamps would
    sample_ddp.main(_args(folder, 3, 2, pretrained=ckpt))  # resumes: one more image
    assert len(_pngs(folder)) == 3 and {k: v for k, v in _pngs(folder).items() if k in first} == first
    # A folder recorded before the fingerprint (file, bytes, mtime) resumes with the same file name and size.
    record = json.loads((folder / sampling.SETTINGS_FILE).read_text())
    record["settings"]["weights"] = {"file": "model.pt", "bytes": len(good), "mtime_ns": 123}
    (folder / sampling.SETTINGS_FILE).write_text(json.dumps(record))
    sample_ddp.main(_args(folder, 3, 2, pretrained=ckpt))
    record["settings"]["weights"]["bytes"] = len(good) + 1
    (folder / sampling.SETTINGS_FILE).write_text(json.dumps(record))
    with pytest.raises(SystemExit):
        sample_ddp.main(_args(folder, 3, 2, pretrained=ckpt))
    assert "weights" in capsys.readouterr().err
    record["settings"]["weights"] = sampling.weights_fingerprint(ckpt / "model.pt")
    (folder / sampling.SETTINGS_FILE).write_text(json.dumps(record))
    # Other weights of the same size are refused.
    other = bytearray(good)
    other[-100] ^= 0xFF  # inside the zip directory at the end: another CRC
    (ckpt / "model.pt").write_bytes(bytes(other))
    with pytest.raises(SystemExit):
        sample_ddp.main(_args(folder, 4, 2, pretrained=ckpt))
    assert "weights" in capsys.readouterr().err


def test_training_output_folder_resolves_to_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    for step in (100, 200):
        ckpt = out / "checkpoints" / f"{step:07d}"
        ckpt.mkdir(parents=True)
        for name in ("config.yaml", "model.pt"):
            (ckpt / name).write_bytes((C2I / name).read_bytes())
    plan = sampling.plan_sampling(sampling.SampleOptions(pretrained=str(out), num_steps_per_stage=[2],
                                                         device="cpu"))
    assert plan.checkpoint.name == "0000200" and plan.num_classes == 1000
    assert plan.sample_dir == Path("samples/run-0000200-cfg2.4-steps2-seed10")


def test_a_checkpoint_folder_still_being_written_is_not_the_newest(tmp_path):
    """OUT/checkpoints/<step> without its config.yaml or weights (a copy in progress) is passed over."""
    out = tmp_path / "run"
    for step, names in ((100, ("config.yaml", "model.pt")), (200, ("model.pt",)), (300, ("config.yaml",))):
        ckpt = out / "checkpoints" / f"{step:07d}"
        ckpt.mkdir(parents=True)
        for name in names:
            (ckpt / name).write_bytes((C2I / name).read_bytes())
    assert sampling.resolve_pretrained(out) == out / "checkpoints" / "0000100"


def test_a_folder_of_pngs_without_settings_is_refused(tmp_path):
    folder = tmp_path / "samples"
    sampling.write_png(sampling.png_path(folder, 0), np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="already holds PNGs but no sampling_args.json"):
        sampling.plan_sampling(sampling.SampleOptions(pretrained=str(C2I), sample_dir=str(folder),
                                                      num_steps_per_stage=[2], device="cpu"))


def test_only_complete_rgb_pngs_of_the_right_size_count_as_finished(tmp_path):
    from PIL import Image
    good = tmp_path / "good.png"
    sampling.write_png(good, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert sampling.is_complete_png(good, 32, 32)
    truncated = tmp_path / "truncated.png"  # the header and size decode; the pixel data is cut short
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert not sampling.is_complete_png(truncated, 32, 32)
    assert not sampling.is_complete_png(good, 16, 16)           # an image of another size
    grey = tmp_path / "grey.png"
    Image.new("L", (32, 32)).save(grey)
    assert not sampling.is_complete_png(grey, 32, 32)           # not RGB
    assert not sampling.is_complete_png(tmp_path / "missing.png", 32, 32)


def test_a_process_samples_the_chunks_of_its_global_rank(tmp_path):
    """Rank 1 of 2 on a node of its own (LOCAL_RANK 0) makes rank 1's images, not rank 0's."""
    from pixelflow.distributed import DistributedContext
    plan = sampling.plan_sampling(sampling.SampleOptions(pretrained=str(C2I), sample_dir=str(tmp_path / "s"),
                                                         num_fid_samples=4, local_batch_size=1,
                                                         num_steps_per_stage=[1], device="cpu", progress=False))
    sampling.sample_to_folder(plan, DistributedContext(rank=1, world_size=2, local_rank=0))
    assert sorted(p.name for p in plan.sample_dir.glob("*.png")) == ["000001.png", "000003.png"]


def test_the_device_comes_from_local_rank_and_the_group_from_rank(monkeypatch):
    """Node 2 of a 2 x 2 job: global rank 3 joins the group as rank 3 and samples on its node's cuda:1."""
    import torch

    from pixelflow import distributed
    joined = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: joined.setdefault("set_device", device))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.init_distributed("cuda")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device) == (3, 4, 1, torch.device("cuda", 1))
    assert joined == {"set_device": torch.device("cuda", 1), "backend": "nccl", "rank": 3, "world_size": 4,
                      "device_id": torch.device("cuda", 1)}
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="inconsistent launch environment: RANK=4, WORLD_SIZE=4"):
        distributed.init_distributed("cpu")


# ------------------------------------------------------------------------------------------ text-to-image
@pytest.fixture
def t2i_ckpt(tmp_path):
    ckpt = tmp_path / "t2i"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes((T2I / "model.pt").read_bytes())
    config = (T2I / "config.yaml").read_text() + "text_encoder:\n  name: tiny-random-t5\n  max_length: 16\n"
    (ckpt / "config.yaml").write_text(config)
    return ckpt


def test_text_to_image_with_prompts(t2i_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\na blue bird\n")
    folder = tmp_path / "t2i_samples"
    sample_ddp.main(_args(folder, 3, 2, "--prompts", str(prompts), pretrained=t2i_ckpt))
    with np.load(sampling.npz_path(folder)) as npz:
        arr = npz["arr_0"]
    assert arr.shape == (3, 32, 32, 3) and arr.dtype == np.uint8
    assert not np.array_equal(arr[0], arr[2])  # same prompt, own noise
    assert sampling.image_prompts(range(3), sampling.load_prompts(prompts)) == ["a red fox", "a blue bird",
                                                                                "a red fox"]
    again = tmp_path / "t2i_batch1"
    sample_ddp.main(_args(again, 3, 1, "--prompts", str(prompts), pretrained=t2i_ckpt))
    assert _pngs(again) == _pngs(folder)

    with pytest.raises(SystemExit):
        sample_ddp.main(_args(tmp_path / "x", 3, 2, pretrained=t2i_ckpt))
    assert "text-to-image checkpoint: pass --prompts" in capsys.readouterr().err


def test_prompts_file_lines(tmp_path):
    """A BOM is not part of prompt 0; a U+2028 inside a prompt does not split it; a folder or a non-UTF-8
    file is named."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\ufeffa red fox\r\nline\u2028two\n\n a blue bird \n", encoding="utf-8")
    assert sampling.load_prompts(prompts) == ["a red fox", "line\u2028two", "a blue bird"]
    with pytest.raises(ValueError, match="is a folder"):
        sampling.load_prompts(tmp_path)
    prompts.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="prompts.txt' is not UTF-8 text"):
        sampling.load_prompts(prompts)


def test_guidance_schedule_constant_is_g_at_every_stage():
    from pixelflow.pipeline import stage_guidance_weights
    from pixelflow.sampling import SampleOptions, check_options
    assert stage_guidance_weights(1.5, 4, True, "constant") == [1.5] * 4
    assert stage_guidance_weights(1.5, 4, True) == pytest.approx([1.0, 1 + 0.5 / 6, 1 + 0.5 * 2 / 3, 1.5])
    assert stage_guidance_weights(0.0, 4, True, "constant") == [1.0] * 4
    with pytest.raises(ValueError, match="'flat'"):
        check_options(SampleOptions(pretrained="x", guidance_schedule="flat"))


# ------------------------------------------------------------------------------------------ files and nodes
def test_written_files_follow_the_umask(tmp_path):
    """PNGs, settings and the .npz are readable by others under umask 022, as np.savez or PIL would make
    them, not 0600 (mkstemp's mode): an evaluator running as another user must read them."""
    from pixelflow import checkpoint
    old = os.umask(0o022)
    try:
        checkpoint._UMASK = None
        folder = tmp_path / "s"
        sample_ddp.main(_args(folder, 2, 2))
        modes = {p.name: p.stat().st_mode & 0o777 for p in [*folder.iterdir(), sampling.npz_path(folder)]}
        assert set(modes.values()) == {0o644}, modes
        os.umask(0o077)
        checkpoint._UMASK = None
        checkpoint.atomic_write(tmp_path / "private.txt", lambda tmp: Path(tmp).write_text("x"))
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
        checkpoint._UMASK = None


def test_a_moved_checkpoint_resumes_its_folder(tmp_path, capsys):
    """A job that copies its checkpoint to a new scratch folder on every requeue must still resume; a
    checkpoint whose config differs must not."""
    import shutil
    first, moved = tmp_path / "scratch1" / "ckpt", tmp_path / "scratch2" / "ckpt"
    shutil.copytree(C2I, first)
    folder = tmp_path / "s"
    sample_ddp.main(_args(folder, 2, 2, pretrained=first))
    shutil.move(first, moved)
    sample_ddp.main(_args(folder, 3, 2, pretrained=moved))
    assert len(list(folder.glob("*.png"))) == 3

    # A folder written when the settings recorded the checkpoint's path (and no config) resumes too.
    record = json.loads((folder / sampling.SETTINGS_FILE).read_text())
    record["settings"].pop("config")
    record["settings"]["checkpoint"] = str(tmp_path / "elsewhere")
    (folder / sampling.SETTINGS_FILE).write_text(json.dumps(record))
    sample_ddp.main(_args(folder, 3, 2, pretrained=moved))
    # ... unless the recorded folder still exists and holds another config (same weights file).
    shutil.copytree(C2I, tmp_path / "other")
    other_config = (tmp_path / "other" / "config.yaml").read_text()
    (tmp_path / "other" / "config.yaml").write_text(other_config.replace("pyramid_shift: false", "pyramid_shift: true"))
    record["settings"]["checkpoint"] = str(tmp_path / "other")
    (folder / sampling.SETTINGS_FILE).write_text(json.dumps(record))
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(folder, 3, 2, pretrained=moved))
    assert e.value.code == 2 and "config" in capsys.readouterr().err
    record["settings"]["checkpoint"] = str(C2I)   # the same config there: resumes
    (folder / sampling.SETTINGS_FILE).write_text(json.dumps(record))
    sample_ddp.main(_args(folder, 3, 2, pretrained=moved))

    config = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(config.replace("num_train_timesteps: 1000", "num_train_timesteps: 500"))
    (folder / sampling.SETTINGS_FILE).write_text(json.dumps({**record, "settings": {
        **record["settings"], "config": sampling.config_fingerprint(sampling.load_config(C2I))}}))
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(folder, 4, 2, pretrained=moved))
    assert e.value.code == 2 and "config" in capsys.readouterr().err


def test_sample_dir_dot_and_unmakeable_folders(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert sampling.npz_path(".") == tmp_path / "here.npz"
    assert sampling.npz_path("sub/..") == tmp_path / "here.npz"
    stale = tmp_path / ".here.npz.abc123.tmp"   # left by a run killed while writing the .npz
    stale.write_bytes(b"partial")
    assert sampling.remove_stale_temporaries(Path(".")) == 1 and not stale.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(_args(blocker / "samples", 2, 2))
    assert e.value.code == 2 and f"{str(blocker)!r} is a file, not a folder" in capsys.readouterr().err


def _two_nodes(tmp_path: Path, node_args: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents of one node each, as two nodes would run them (one rendezvous, its own agent)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(REPO / "sample_ddp.py"), *args], cwd=tmp_path, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank, args in enumerate(node_args)]
    out = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=120)   # the barrier timeout is 6 h: a hang shows as a timeout
            out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return out


def test_a_node_that_rejects_the_command_stops_every_node(tmp_path):
    """One node lacks the checkpoint: both nodes exit at once (before, the other waited 6 h in the group)."""
    folder = tmp_path / "s"
    missing = tmp_path / "missing_ckpt"
    good, bad = _two_nodes(tmp_path, [_args(folder, 4, 2), _args(folder, 4, 2, pretrained=missing)])
    assert bad.returncode != 0 and f"checkpoint folder {str(missing)!r} does not exist" in bad.stdout
    assert good.returncode != 0 and "checking the options failed on 1 other process(es)" in good.stdout
    assert not folder.exists()


def test_nodes_with_different_weights_refuse_to_mix_images(tmp_path):
    import shutil
    import torch
    other = tmp_path / "other_ckpt"
    shutil.copytree(C2I, other)
    state = torch.load(other / "model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] * 1.5
    torch.save(state, other / "model.pt")
    folder = tmp_path / "s"
    results = _two_nodes(tmp_path, [_args(folder, 4, 2), _args(folder, 4, 2, pretrained=other)])
    for rank, result in enumerate(results):
        assert result.returncode != 0
        assert f"disagree on the sampling settings (a checkpoint that differs between nodes?); this process " \
               f"(rank {rank})" in result.stdout, result.stdout[-2000:]
    assert not folder.exists()


def test_extending_a_folder_removes_its_old_npz_until_the_new_one_is_written(tmp_path, monkeypatch):
    folder = tmp_path / "s"
    sample_ddp.main(_args(folder, 2, 2))
    assert sampling.npz_path(folder).exists()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after its images, before the new .npz
    monkeypatch.setattr(sampling, "write_npz", killed)
    with pytest.raises(KeyboardInterrupt):
        sample_ddp.main(_args(folder, 3, 2))
    assert len(list(folder.glob("*.png"))) == 3 and not sampling.npz_path(folder).exists()
    monkeypatch.undo()
    sample_ddp.main(_args(folder, 3, 2))
    with np.load(sampling.npz_path(folder)) as npz:
        assert npz["arr_0"].shape[0] == 3


def test_a_node_with_an_unparsable_config_stops_every_node(tmp_path):
    """Not only ValueErrors: any error while checking the options is reported to the other processes."""
    import shutil
    broken = tmp_path / "broken_ckpt"
    shutil.copytree(C2I, broken)
    (broken / "config.yaml").write_text("model: [unclosed\n")
    folder = tmp_path / "s"
    good, bad = _two_nodes(tmp_path, [_args(folder, 4, 2), _args(folder, 4, 2, pretrained=broken)])
    assert bad.returncode != 0 and "yaml" in bad.stdout.lower()
    assert good.returncode != 0 and "checking the options failed on 1 other process(es)" in good.stdout
