"""Training: loss, augmentation, config, the resumable loop, train_model and the `train` command.

Built on SliceSets and a tiny PNG dataset made here (tiny preset, 32 px), so the tests stand alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from weightzoo.data.raw import RawDataset, RawDatasetWriter
from weightzoo.data.slices import Preprocessing, SliceSet
from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.nets.unet import real_state_dict
from weightzoo.segmenter import load_model
from weightzoo.train import DiceBCELoss, TrainConfig, augment_batch, train_model, train_on_slices
from weightzoo.train.loop import (
    CKPT_JSON,
    CKPT_WEIGHTS,
    LOG_JSON,
    format_dice,
    history_from_json,
    history_to_json,
    sample_indices,
)
from weightzoo.train.losses import dice_counts, dice_from_counts

TASKS = ["outer", "inner"]


def ellipse_slices(n: int, seed: int, size: int = 32) -> SliceSet:
    """Noisy bright ellipses with a brighter core: task 'outer' (whole ellipse) and 'inner' (core)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, 1, size, size), np.float32)
    labels = np.zeros((n, 2, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.12, 0.3, 2) * size
        outer = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        inner = ((yy - cy) / (0.5 * ry)) ** 2 + ((xx - cx) / (0.5 * rx)) ** 2 <= 1
        img = 1.0 * outer + 0.7 * inner + rng.normal(0, 0.35, (size, size))
        images[i, 0] = (img - img.mean()) / img.std()
        labels[i] = outer, inner
    meta = [{"case": f"c{i}", "subject": f"s{i}", "site": "AB"[i % 2], "slice": 0} for i in range(n)]
    return SliceSet(images, labels, list(TASKS), meta, Preprocessing(size=(size, size)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets gain nothing from threads, and OpenMP threads crawl when parallel test runs
    oversubscribe the CPU. One thread here, and in the SIGKILL child: the same kernels, bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slices() -> tuple[SliceSet, SliceSet]:
    return ellipse_slices(48, seed=0), ellipse_slices(16, seed=1)


def tiny_cfg(**kw: object) -> TrainConfig:
    base = dict(
        tasks=TASKS, preset="tiny", steps=12, batch_size=8, size=(32, 32), val_every=5, checkpoint_every=4
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def weights(result_or_folder: object) -> dict[str, torch.Tensor]:
    net = (
        result_or_folder.segmenter.net
        if hasattr(result_or_folder, "segmenter")
        else load_model(result_or_folder, "cpu").net
    )
    return {k: v.detach().cpu() for k, v in real_state_dict(net).items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ---- loss ------------------------------------------------------------------------------------------
def test_loss_is_dice_plus_bce_per_channel_and_fp32_under_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(4, 2, 16, 16, generator=g) > 0.7).float()
    target[:, 1] = torch.maximum(target[:, 1], target[:, 0])  # overlapping regions, as nnU-Net allows
    logits = torch.randn(4, 2, 16, 16, generator=g)
    loss = DiceBCELoss()
    p = torch.sigmoid(logits)
    inter, denom = (p * target).sum((0, 2, 3)), (p + target).sum((0, 2, 3))  # batch Dice
    dice = 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(loss(logits, target), dice + bce, atol=1e-5)
    perfect = (target * 2 - 1) * 30
    assert float(loss(perfect, target)) < 1e-3 < float(loss(-perfect, target)) - 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(logits.bfloat16(), target)
    assert out.dtype == torch.float32


def test_dice_counts_give_global_dice() -> None:
    target = torch.zeros(2, 2, 4, 4)
    target[0, 0, :2] = 1  # task 0: 8 px truth
    logits = torch.full((2, 2, 4, 4), -5.0)
    logits[0, 0, :1] = 5  # 4 px predicted, all correct
    dice = dice_from_counts(dice_counts(logits, target))
    assert dice[0] == pytest.approx(2 * 4 / (4 + 8))
    assert np.isnan(dice[1])  # both empty: undefined


# ---- augmentation ----------------------------------------------------------------------------------
def test_augmentation_keeps_images_and_labels_aligned() -> None:
    """Augment an image that IS its label: after rotation, scaling and mirroring they must still match."""
    labels = torch.from_numpy(ellipse_slices(64, seed=3, size=24).labels[..., :20])  # non-square 24 x 20
    x, y = augment_batch(labels.float(), labels, 1.0, torch.Generator().manual_seed(0), intensity=False)
    assert y.dtype == labels.dtype and x.shape == labels.shape and y.shape == labels.shape
    assert torch.equal((x >= 0.5).to(y.dtype), y)
    moved = [i for i in range(len(y)) if not torch.equal(y[i], labels[i])]
    assert len(moved) > 30, "strength 1 should move most samples (mirroring alone: 75 %)"
    # intensity transforms change images only; they never move labels
    images = torch.randn(64, 1, 24, 20, generator=torch.Generator().manual_seed(2))
    x2, y2 = augment_batch(images, labels, 1.0, torch.Generator().manual_seed(1), spatial=False)
    assert torch.equal(y2, labels) and not torch.equal(x2, images)


def test_augmentation_is_deterministic_and_strength_zero_is_identity() -> None:
    s = ellipse_slices(16, seed=4)
    images, labels = torch.from_numpy(s.images), torch.from_numpy(s.labels)
    a = augment_batch(images, labels, 1.0, torch.Generator().manual_seed(7))
    b = augment_batch(images, labels, 1.0, torch.Generator().manual_seed(7))
    c = augment_batch(images, labels, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    off = augment_batch(images, labels, 0.0, torch.Generator().manual_seed(7))
    assert torch.equal(off[0], images) and torch.equal(off[1], labels)
    assert torch.equal(images, torch.from_numpy(s.images)), "inputs must not be modified"
    with pytest.raises(ValueError, match="strength"):
        augment_batch(images, labels, 1.5, torch.Generator())


def test_foreground_oversampling_draws_the_last_third_from_foreground() -> None:
    fg = [torch.tensor([3, 5]), torch.tensor([], dtype=torch.long)]
    idx = sample_indices(torch.Generator().manual_seed(0), 100, fg, batch_size=16, oversample=0.33)
    assert len(idx) == 16 and set(idx[-5:].tolist()) <= {3, 5}  # 16 - round(16 * 0.67) = 5 forced


# ---- config ----------------------------------------------------------------------------------------
def test_config_rejects_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"unknown training config key\(s\) \['step'\]"):
        TrainConfig.from_dict({"tasks": ["cord"], "step": 10})
    path = tmp_path / "cfg.yaml"
    path.write_text("tasks: [cord]\nlearning_rate: 0.1\n")
    with pytest.raises(InputError, match="learning_rate") as e:
        TrainConfig.from_file(path)
    assert str(path) in str(e.value)
    with pytest.raises(UnknownNameError, match="optimizer 'rmsprop'"):
        TrainConfig.from_dict({"tasks": ["cord"], "optimizer": "rmsprop"})
    with pytest.raises(InputError, match="not a multiple of 8"):
        TrainConfig.from_dict({"tasks": ["cord"], "size": [60, 60]})
    with pytest.raises(InputError, match="augment"):
        TrainConfig(tasks=["cord"], augment=2.0)
    cfg = TrainConfig.from_dict({"tasks": "cord,gm", "size": [32, 32], "lr": "0.02"})
    assert cfg.tasks == ["cord", "gm"] and cfg.size == (32, 32) and cfg.learning_rate == 0.02
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---- the training loop -----------------------------------------------------------------------------
def test_training_learns_an_easy_task(slices: tuple[SliceSet, SliceSet], tmp_path: Path) -> None:
    train, val = slices
    cfg = tiny_cfg(steps=80, val_every=20, checkpoint_every=1000)
    result = train_on_slices(train, val, cfg, tmp_path / "run", progress=False)
    first, last = result.history[0], result.history[-1]
    assert [h["step"] for h in result.history] == [20, 40, 60, 80]
    assert last["train_loss"] < 0.7 * first["train_loss"]
    assert last["val_dice"]["outer"] > 0.85 and last["val_dice"]["inner"] > 0.5
    # the model folder round-trips and predicts what the trained net predicts
    seg = load_model(tmp_path / "run", "cpu")
    assert (
        seg.tasks == TASKS
        and json.loads((tmp_path / "run" / LOG_JSON).read_text())["history"] == result.history
    )
    np.testing.assert_allclose(
        seg.predict_batch(val.images[:4]), result.segmenter.predict_batch(val.images[:4]), atol=1e-6
    )
    assert not (tmp_path / "run" / CKPT_WEIGHTS).exists(), "checkpoints are removed once the model is written"


def test_same_seed_same_weights_other_seed_other_weights(
    slices: tuple[SliceSet, SliceSet], tmp_path: Path
) -> None:
    train, val = slices
    a = train_on_slices(train, val, tiny_cfg(steps=6), tmp_path / "a", progress=False)
    b = train_on_slices(train, val, tiny_cfg(steps=6), tmp_path / "b", progress=False)
    c = train_on_slices(train, val, tiny_cfg(steps=6, seed=1), tmp_path / "c", progress=False)
    assert_same_weights(weights(a), weights(b))
    assert not torch.equal(
        weights(a)["encoder.stages.0.0.convs.0.conv.weight"],
        weights(c)["encoder.stages.0.0.convs.0.conv.weight"],
    )


@pytest.mark.parametrize("optimizer,dropout", [("sgd", 0.0), ("adam", 0.2)])
def test_resume_after_stop_matches_uninterrupted_run(
    slices: tuple[SliceSet, SliceSet], tmp_path: Path, optimizer: str, dropout: float
) -> None:
    train, val = slices
    cfg = tiny_cfg(steps=14, optimizer=optimizer, dropout=dropout, val_every=3, checkpoint_every=4)
    full = train_on_slices(train, val, cfg, tmp_path / "full", progress=False)
    part = train_on_slices(train, val, cfg, tmp_path / "cut", progress=False, stop_after=10)  # "killed" at 10
    assert not part.finished and json.loads((tmp_path / "cut" / CKPT_JSON).read_text())["step"] == 8
    resumed = train_on_slices(train, val, cfg, tmp_path / "cut", progress=False)
    assert resumed.resumed_from == 8 and resumed.finished
    assert_same_weights(weights(full), weights(resumed))
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)


_CHILD = """
import sys, time, numpy as np
import weightzoo.train.loop as loop
from weightzoo.data.slices import Preprocessing, SliceSet
d = np.load(sys.argv[1])
s = SliceSet(d["images"], d["labels"], ["outer", "inner"], [], Preprocessing(size=(32, 32)))
step = loop.train_step
def slow_step(*a, **k):  # slow the run down so that the parent can kill it mid-way
    time.sleep(0.05)
    return step(*a, **k)
loop.train_step = slow_step
cfg = loop.TrainConfig.from_dict(__import__("json").loads(sys.argv[3]))
loop.train_on_slices(s, None, cfg, sys.argv[2], progress=False)
"""


def test_resume_after_sigkill_matches_uninterrupted_run(
    slices: tuple[SliceSet, SliceSet], tmp_path: Path
) -> None:
    """A training process killed with SIGKILL, re-run with the same arguments, ends bit-identical."""
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs POSIX signals")
    train, _ = slices
    cfg = tiny_cfg(steps=80, val_every=7, checkpoint_every=5)
    np.savez(tmp_path / "slices.npz", images=train.images, labels=train.labels)
    out = tmp_path / "killed"
    args = [sys.executable, "-c", _CHILD, str(tmp_path / "slices.npz"), str(out), json.dumps(cfg.to_dict())]
    child = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    try:
        while not (out / CKPT_JSON).exists() or json.loads((out / CKPT_JSON).read_text())["step"] < 15:
            assert child.poll() is None, "the child process ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL and not (out / "model.json").exists()
    step_at_kill = json.loads((out / CKPT_JSON).read_text())["step"]
    assert 15 <= step_at_kill < cfg.steps
    resumed = train_on_slices(train, None, cfg, out, progress=False)
    assert resumed.resumed_from >= 15
    full = train_on_slices(train, None, cfg, tmp_path / "full", progress=False)
    assert_same_weights(weights(full), weights(resumed))


def test_out_dir_of_another_run_is_refused(slices: tuple[SliceSet, SliceSet], tmp_path: Path) -> None:
    train, val = slices
    out = tmp_path / "run"
    train_on_slices(train, val, tiny_cfg(steps=10), out, progress=False, stop_after=5)  # checkpoint at 4
    with pytest.raises(ModelError, match=r"checkpoint of another run \(lr: 0.01 vs 0.05\)") as e:
        train_on_slices(train, val, tiny_cfg(steps=10, lr=0.05), out, progress=False)
    assert str(out) in str(e.value) and "--force" in str(e.value)
    with pytest.raises(ModelError, match="other training data"):
        train_on_slices(ellipse_slices(48, seed=9), val, tiny_cfg(steps=10), out, progress=False)
    # run-only keys (validation/checkpoint frequency, device) may differ on resume
    done = train_on_slices(train, val, tiny_cfg(steps=10, val_every=2, device="cpu"), out, progress=False)
    assert done.resumed_from == 4
    again = train_on_slices(train, val, tiny_cfg(steps=10), out, progress=False)
    assert again.skipped and again.history == done.history
    assert_same_weights(weights(again), weights(done))
    with pytest.raises(ModelError, match=r"finished model of another run \(steps: 10 vs 12\)"):
        train_on_slices(train, val, tiny_cfg(steps=12), out, progress=False)
    forced = train_on_slices(train, val, tiny_cfg(steps=12), out, progress=False, force=True)
    assert forced.finished and not forced.skipped and forced.history[-1]["step"] == 12


def test_undefined_val_dice_is_nan_in_memory_and_null_in_json() -> None:
    history = [{"step": 5, "train_loss": 1.0, "val_dice": {"outer": 0.5, "inner": float("nan")}}]
    as_json = history_to_json(history)
    assert as_json[0]["val_dice"] == {"outer": 0.5, "inner": None}
    json.dumps(as_json, allow_nan=False)  # strict JSON
    back = history_from_json(json.loads(json.dumps(as_json)))
    assert back[0]["val_dice"]["outer"] == 0.5 and np.isnan(back[0]["val_dice"]["inner"])
    assert format_dice(history[0]["val_dice"]) == "outer 0.500, inner n/a"


def test_corrupt_checkpoint_is_a_clear_error(slices: tuple[SliceSet, SliceSet], tmp_path: Path) -> None:
    train, val = slices
    train_on_slices(train, val, tiny_cfg(steps=10), tmp_path, progress=False, stop_after=5)
    ckpt = tmp_path / CKPT_WEIGHTS
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated, e.g. a full disk
    with pytest.raises(ModelError, match="cannot read the training checkpoint") as e:
        train_on_slices(train, val, tiny_cfg(steps=10), tmp_path, progress=False)
    assert str(ckpt) in str(e.value) and "delete it" in str(e.value)


def test_slices_must_match_the_config(slices: tuple[SliceSet, SliceSet], tmp_path: Path) -> None:
    train, val = slices
    with pytest.raises(InputError, match=r"slices are \[32, 32\] px, the config says size \[64, 64\]"):
        train_on_slices(train, val, tiny_cfg(size=(64, 64)), tmp_path, progress=False)
    with pytest.raises(InputError, match="tasks"):
        train_on_slices(train, val, tiny_cfg(tasks=["outer"]), tmp_path, progress=False)


# ---- train_model and the CLI on a raw dataset ------------------------------------------------------
@pytest.fixture(scope="module")
def png_dataset(tmp_path_factory: pytest.TempPathFactory) -> RawDataset:
    """2 sites x 5 subjects of 32 x 32 gray PNGs (labels: 1 ellipse, 2 core); test images deleted."""
    s = ellipse_slices(10, seed=5)
    labels = {"background": 0, "ring": 1, "core": 2}
    tasks = {"outer": [1, 2], "inner": [2]}
    w = RawDatasetWriter(
        tmp_path_factory.mktemp("raw"), 990, "Ellipses", {"0": "gray"}, labels, ".png", tasks
    )
    for i in range(10):
        img = np.clip((s.images[i, 0] + 3) * 40, 0, 255).astype(np.uint8)
        label = s.labels[i, 0] + s.labels[i, 1]  # 1 ring, 2 core
        w.add_case(f"case{i:02d}", [img], label, site="AB"[i % 2], subject=f"sub{i:02d}")
    ds = w.finish()
    for case in ds.cases_in("test"):  # training must never read the test split
        for f in ds.image_files(case):
            f.unlink()
    return ds


def test_train_model_uses_train_and_val_subjects_only(png_dataset: RawDataset, tmp_path: Path) -> None:
    cfg = tiny_cfg(steps=4, val_every=2)
    result = train_model(png_dataset, cfg, tmp_path / "m", sites=["A"], progress=False)
    info = json.loads((tmp_path / "m" / "model.json").read_text())["info"]
    splits = png_dataset.splits()
    assert info["dataset"] == "Dataset990_Ellipses" and info["sites"] == ["A"]
    assert set(info["split"]["train"]) <= set(splits["train"]) and set(info["split"]["val"]) <= set(
        splits["val"]
    )
    assert all(png_dataset.site(c) == "A" for c in info["cases"]["train"] + info["cases"]["val"])
    assert result.history[-1]["val_dice"].keys() == {"outer", "inner"}
    with pytest.raises(UnknownNameError, match=r"unknown site 'Z'.*A, B"):
        train_model(png_dataset, cfg, tmp_path / "z", sites=["Z"], progress=False)


def _cli() -> typer.Typer:
    from weightzoo.cli import train as train_cli

    app = typer.Typer()
    train_cli.register(app)

    @app.callback()
    def _root() -> None:  # keeps `train` a sub-command, as in the real app
        pass

    return app


def test_train_command(png_dataset: RawDataset, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("preset: tiny\nbatch_size: 4\nval_every: 2\nsteps: 99\n")
    args = ["train", "--dataset", str(png_dataset.root), "--task", "outer,inner", "--steps", "4"]
    args += ["--size", "32", "--config", str(cfg_file), "--out", str(out), "--device", "cpu", "--no-progress"]
    res = runner.invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "model written to" in text and "val Dice outer" in text
    saved = json.loads((out / "model.json").read_text())["info"]["config"]
    assert saved["steps"] == 4 and saved["preset"] == "tiny" and saved["batch_size"] == 4  # CLI beats file
    res = runner.invoke(_cli(), args)
    assert res.exit_code == 0 and "already holds this finished run" in " ".join(res.output.split())
    res = runner.invoke(_cli(), [*args[:3], "--task", "lesion", *args[5:]])
    assert isinstance(res.exception, UnknownNameError) and "unknown task 'lesion'" in str(res.exception)
    assert "inner, outer" in str(res.exception)
    res = runner.invoke(_cli(), [*args, "--site", "Q"])
    assert isinstance(res.exception, UnknownNameError) and "unknown site 'Q'" in str(res.exception)
    cfg_file.write_text("tasks: [outer]\nsteps: 4\nwarmup: 3\n")
    res = runner.invoke(_cli(), ["train", "--dataset", str(png_dataset.root), "--config", str(cfg_file)])
    assert isinstance(res.exception, InputError) and "warmup" in str(res.exception)
