"""In-context segmentation: CrossConv split form, set invariance, candidates, API errors, CLI, shipped weights."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo import incontext
from weightzoo.cli import main
from weightzoo.errors import InputError, ModelError
from weightzoo.incontext.model import (
    CrossConv2d,
    InContextNet,
    InContextSpec,
    best_candidate_loss,
    soft_dice_bce,
)
from weightzoo.incontext.tasks import (
    SynthShapes,
    SynthSuperpixel,
    TaskSampler,
    check_trainable,
    dataset_pools,
    is_held_out,
)
from weightzoo.incontext.train import InContextConfig, train_incontext

SMALL = InContextSpec((4, 8), 16)


def _net(spec: InContextSpec = SMALL, seed: int = 0) -> InContextNet:
    torch.manual_seed(seed)
    return InContextNet(spec).eval()


def _disk_task(n: int, size: int = 48, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Bright disks of random position on a dark noisy background; label = the disk."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    xs, ys = [], []
    for _ in range(n):
        cy, cx, r = [*rng.uniform(0.3, 0.7, 2).tolist(), rng.uniform(0.12, 0.2)]
        m = (yy - cy * size) ** 2 + (xx - cx * size) ** 2 <= (r * size) ** 2
        xs.append((m * 200.0 + rng.normal(20, 8, (size, size))).astype(np.float32))
        ys.append(m)
    return xs, ys


# ---- model ---------------------------------------------------------------------------------------------
def test_crossconv_split_equals_concat() -> None:
    torch.manual_seed(0)
    conv = CrossConv2d(5, 3, 7)
    q, s = torch.randn(2, 3, 5, 12, 10), torch.randn(2, 4, 3, 12, 10)
    split, ref = conv(q, s), conv.forward_concat(q, s)
    assert split.shape == (2, 3, 4, 7, 12, 10)
    torch.testing.assert_close(split, ref, atol=1e-5, rtol=1e-5)
    # and the reference really is one Conv2d over the concatenated pair
    pair = torch.cat([q[1, 2], s[1, 3]], 0)[None]
    torch.testing.assert_close(
        ref[1, 2, 3], torch.nn.functional.conv2d(pair, conv.weight, conv.bias, padding=1)[0]
    )


def test_network_split_concat_and_chunked_agree() -> None:
    net = _net(InContextSpec((4, 8, 8), 16))
    q, s = torch.rand(2, 1, 16, 16), torch.rand(2, 5, 2, 16, 16)
    noise = torch.randn(2, 3, 1, 16, 16)
    with torch.no_grad():
        a = net(q, s, 3, noise=noise)
        b = net(q, s, 3, noise=noise, concat=True)
        c = net(q, s, 3, noise=noise, chunk=2)
    assert a.shape == (2, 3, 16, 16)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_support_is_a_set() -> None:
    net = _net()
    q, s = torch.rand(1, 1, 16, 16), torch.rand(1, 6, 2, 16, 16)
    noise = torch.randn(1, 2, 1, 16, 16)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        a, b = net(q, s, 2, noise=noise), net(q, s[:, perm], 2, noise=noise)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_candidates_differ_and_interact() -> None:
    net = _net()
    q, s = torch.rand(1, 1, 16, 16), torch.rand(1, 4, 2, 16, 16)
    noise = torch.randn(1, 3, 1, 16, 16)
    with torch.no_grad():
        out = net(q, s, 3, noise=noise)
        alone = net(q, s, 1, noise=noise[:, :1])
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-4
    # the set block makes candidate 0 depend on the others (Tyche), so it differs from a lone run
    assert (out[0, 0] - alone[0, 0]).abs().max() > 1e-6


def test_best_candidate_loss() -> None:
    logits, target = torch.randn(3, 4, 8, 8), (torch.rand(3, 8, 8) > 0.5).float()
    per = soft_dice_bce(logits, target)
    assert torch.isclose(best_candidate_loss(logits, target), per.min(1).values.mean())
    assert torch.isclose(best_candidate_loss(logits[:, :1], target), per[:, 0].mean())


# ---- tasks ---------------------------------------------------------------------------------------------
def test_sampler_shapes_and_determinism() -> None:
    sampler = TaskSampler([SynthShapes(32), SynthSuperpixel(32)])
    x, y, names = sampler.sample(3, 5, torch.Generator().manual_seed(1))
    x2, _, _ = sampler.sample(3, 5, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (3, 5, 32, 32) and len(names) == 3
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and set(y.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x, x2)


def test_held_out_tasks_are_refused(tiny_phantom_dataset) -> None:
    assert is_held_out("wbc", "nucleus") and is_held_out("wbc", "cell") and is_held_out("sct", "gm")
    assert is_held_out("sct", "cord", "t2") and is_held_out("phantom", "cord", "D")
    assert not is_held_out("phantom", "cord", "A")
    with pytest.raises(InputError, match="held out"):
        check_trainable("wbc", "nucleus", "Dataset1")
    pools = dataset_pools(tiny_phantom_dataset, 32)
    assert pools and not any("/canal/" in k for k in pools)  # canal is held out at every site
    assert any(k.endswith("/cord/A") for k in pools)


# ---- training --------------------------------------------------------------------------------------------
def test_tiny_training_resumes_exactly(tmp_path: Path) -> None:
    cfg = InContextConfig.preset("tiny", steps=6, log_every=3, checkpoint_every=3, val_tasks=2)
    full = train_incontext(cfg, tmp_path / "full", log=None)
    assert full["finished"] and (tmp_path / "full" / "model.safetensors").exists()
    assert not train_incontext(cfg, tmp_path / "cut", stop_after=4, log=None)["finished"]
    train_incontext(cfg, tmp_path / "cut", log=None)
    a = incontext.load_model(tmp_path / "full", "cpu").state_dict()
    b = incontext.load_model(tmp_path / "cut", "cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "cut" / "log.json").read_text())["history"]
    assert [h["step"] for h in log] == [3, 6] and "val_dice" in log[-1]
    with pytest.raises(ModelError, match="finished"):
        train_incontext(cfg, tmp_path / "full", log=None)


# ---- API -------------------------------------------------------------------------------------------------
def test_segment_shapes_rgb_and_ranges() -> None:
    net = _net()
    sx, sy = _disk_task(4)
    query = np.random.default_rng(1).random((30, 50)) * 5000.0
    p = incontext.segment(query, sx, sy, model=net)
    assert p.shape == (1, 30, 50) and p.dtype == np.float32 and 0 <= p.min() <= p.max() <= 1
    rgb = np.random.default_rng(2).random((20, 24, 3))
    assert incontext.segment(rgb, np.stack(sx), np.stack(sy), candidates=2, model=net).shape == (2, 20, 24)
    many = incontext.segment(query, sx, sy, candidates=3, ensemble=2, tta=2, model=net)
    assert many.shape == (3, 30, 50) and np.abs(many[0] - many[1]).max() > 1e-4
    # views with negative strides (what a reoriented NIfTI slice is) are fine
    flipped = incontext.segment(query[::-1], [x[:, ::-1] for x in sx], [m[:, ::-1] for m in sy], model=net)
    assert flipped.shape == (1, 30, 50)
    # {0, 255} masks are binary too, and give the same result as {0, 1}
    same = incontext.segment(query, sx, [m.astype(np.uint8) * 255 for m in sy], model=net)
    np.testing.assert_allclose(same, p, atol=1e-6)


def test_segment_is_invariant_to_support_order() -> None:
    net = _net()
    sx, sy = _disk_task(5)
    query = _disk_task(1, seed=9)[0][0]
    a = incontext.segment(query, sx, sy, model=net)
    b = incontext.segment(query, sx[::-1], sy[::-1], model=net)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        ([], [], "support set is empty"),
        ([np.zeros((8, 8))] * 3, [np.zeros((8, 8))] * 2, "3 support images but 2 labels"),
        ([np.zeros((8, 8))], [np.zeros((8, 9))], "label is"),
        ([np.zeros((8, 8))], [np.arange(64).reshape(8, 8) % 3], "not binary"),
        ([np.zeros((8, 8))], [np.full((8, 8), 0.3) * (np.arange(64).reshape(8, 8) % 2)], None),
        ([np.full((8, 8), np.nan)], [np.ones((8, 8))], "NaN"),
    ],
)
def test_segment_errors(images, labels, match) -> None:
    net = _net()
    if match is None:  # {0, 0.3}: two values, one of them 0 -> accepted as binary
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", incontext.InContextWarning)
            assert incontext.segment(np.zeros((8, 8)), images, labels, model=net).shape == (1, 8, 8)
        return
    with pytest.raises(InputError, match=match):
        incontext.segment(np.zeros((8, 8)), images, labels, model=net)


def test_segment_bad_counts_and_volume_query() -> None:
    net = _net()
    sx, sy = _disk_task(2)
    with pytest.raises(InputError, match="candidates"):
        incontext.segment(sx[0], sx, sy, candidates=0, model=net)
    with pytest.raises(InputError, match="volume"):
        incontext.segment(np.zeros((10, 10, 10)), sx, sy, model=net)


def test_segment_warnings() -> None:
    net = _net()
    sx, sy = _disk_task(3)
    with pytest.warns(incontext.InContextWarning, match="one example"):
        incontext.segment(sx[0], sx[:1], sy[:1], model=net)
    with pytest.warns(incontext.InContextWarning, match="empty"):
        incontext.segment(sx[0], sx, [np.zeros_like(m) for m in sy], model=net)


# ---- shipped weights -----------------------------------------------------------------------------------
def test_shipped_weights_load_offline_and_segment() -> None:
    folder = incontext.shipped_weights_dir()
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "weightzoo-incontext" and meta["command"] and meta["finished"]
    assert (folder / "model.safetensors").stat().st_size < 5 * 2**20
    assert (folder / "train_log.json").exists() and (folder / "README.md").exists()
    net = incontext.load_model()
    assert net.spec.size == meta["spec"]["size"]
    sx, sy = _disk_task(8, 64)
    qx, qy = _disk_task(4, 64, seed=5)
    probs = incontext.segment_batch(qx, sx, sy, candidates=3)
    d = [
        2 * ((p[0] >= 0.5) & m).sum() / ((p[0] >= 0.5).sum() + m.sum())
        for p, m in zip(probs, qy, strict=True)
    ]
    assert float(np.mean(d)) > 0.7  # a trivially easy unseen task: the trained model must get it
    assert max(np.abs(p[0] - p[1]).max() for p in probs) > 1e-3  # candidates differ


def test_corrupt_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        incontext.load_model(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"format": "weightzoo-incontext", "spec": {"features": [4], "size": 16}})
    )
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelError, match="weights"):
        incontext.load_model(tmp_path)


# ---- CLI -----------------------------------------------------------------------------------------------
def _write_support(folder: Path, n: int = 4, size: int = 48) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = _disk_task(n, size)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(folder / f"ex{i}.png")
        Image.fromarray(y.astype(np.uint8) * 255).save(folder / f"ex{i}_mask.png")


def test_cli_png_and_candidates(tmp_path: Path) -> None:
    from PIL import Image

    _write_support(tmp_path / "sup")
    q = _disk_task(1, 40, seed=3)[0][0]
    Image.fromarray(np.clip(q, 0, 255).astype(np.uint8)).save(tmp_path / "q.png")
    assert (
        main(
            [
                "incontext",
                "-i",
                str(tmp_path / "q.png"),
                "--support",
                str(tmp_path / "sup"),
                "-o",
                str(tmp_path / "o.png"),
            ]
        )
        == 0
    )
    out = np.asarray(Image.open(tmp_path / "o.png"))
    assert out.shape == (40, 40) and set(np.unique(out).tolist()) <= {0, 1}
    args = [
        "incontext",
        "-i",
        str(tmp_path / "q.png"),
        "--support",
        str(tmp_path / "sup"),
        "-o",
        str(tmp_path / "c.png"),
    ]
    assert main([*args, "--candidates", "2", "--tta", "1"]) == 0
    assert (tmp_path / "c_cand1.png").exists() and (tmp_path / "c_cand2.png").exists()


def test_cli_support_folder_errors(tmp_path: Path, capsys) -> None:
    from PIL import Image

    _write_support(tmp_path / "sup", 2)
    (tmp_path / "sup" / "ex1_mask.png").unlink()
    q = ["incontext", "-i", str(tmp_path / "sup" / "ex0.png"), "-o", str(tmp_path / "o.png"), "--support"]
    assert main([*q, str(tmp_path / "sup")]) == 2
    assert "without a mask" in capsys.readouterr().err
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "sup" / "lost_mask.png")
    (tmp_path / "sup" / "ex1.png").unlink()
    assert main([*q, str(tmp_path / "sup")]) == 2
    assert "mask without its image" in capsys.readouterr().err
    multi = tmp_path / "multi"
    multi.mkdir()
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(multi / "a.png")
    Image.fromarray((np.arange(48 * 48).reshape(48, 48) % 3 * 100).astype(np.uint8)).save(
        multi / "a_mask.png"
    )
    assert main([*q, str(multi)]) == 2
    assert "--label" in capsys.readouterr().err
    assert main([*q, str(multi), "--label", "100"]) == 0


def test_cli_nifti_volume_on_input_grid(tmp_path: Path, tiny_phantom_dataset) -> None:
    import nibabel as nib

    ds = tiny_phantom_dataset
    cases = ds.cases_in(None, ["A"])
    query = ds.image_files(cases[0])[0]
    out = tmp_path / "mask.nii.gz"
    rc = main(
        [
            "incontext",
            "-i",
            str(query),
            "--support",
            str(ds.root),
            "--task",
            "cord",
            "--site",
            "A",
            "-o",
            str(out),
            "--max-support",
            "8",
        ]
    )
    assert rc == 0
    ref, got = nib.load(str(query)), nib.load(str(out))
    assert got.shape == ref.shape and np.allclose(got.affine, ref.affine)
    assert set(np.unique(np.asarray(got.dataobj)).tolist()) <= {0, 1}
    assert main(["incontext", "-i", str(query), "--support", str(ds.root), "-o", str(out)]) == 2  # no --task


def test_cli_train_and_eval(tmp_path: Path) -> None:
    assert (
        main(
            [
                "incontext",
                "train",
                "--preset",
                "tiny",
                "--tasks",
                "synth",
                "--steps",
                "4",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert (tmp_path / "m" / "config.json").exists()
    rc = main([
        "incontext", "eval", "--model", str(tmp_path / "m"), "--heldout", "phantom-canal", "--support-sizes", "1,2",
        "--repeats", "1", "--nnunet-steps", "0", "--out", str(tmp_path / "ev"),
    ])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [r["S"] for r in res["rows"]] == [1, 2] and (tmp_path / "ev" / "report.html").exists()
    assert (
        main(
            [
                "incontext",
                "train",
                "--tasks",
                "raw:/nonexistent",
                "--preset",
                "tiny",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


def test_demo_incontext(tmp_path: Path) -> None:
    from weightzoo.evaluate.report import Report
    from weightzoo.incontext.demo import demo_incontext

    rep = Report(tmp_path, "demo")
    res = demo_incontext(tmp_path, rep, log=lambda s: None, seconds_budget=5)
    assert res["n_support"] == 8 and res["n_queries"] == 4 and 0 <= res["dice"] <= 1
    assert res["best_candidate_dice"] >= res["dice"] - 1e-9 or np.isnan(res["dice"])
    assert Path(res["figure"]).exists() and "In-context" in rep.write().read_text()
