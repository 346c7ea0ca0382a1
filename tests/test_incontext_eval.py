"""In-context evaluation on held-out tasks: baseline, GED with two raters, CHASE/HC18 loaders, the
group-safe split, errors, and the curve/summary code on a tiny net (real-data tests skip without it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weightzoo.cli import main
from weightzoo.errors import InputError, UnknownNameError
from weightzoo.incontext.evalreport import results_markdown, summarize
from weightzoo.incontext.evaluate import (
    EvalSettings,
    EvalTask,
    evaluate_task,
    ged,
    load_eval_task,
    mean_of_support,
    run_evaluation,
    split_queries,
)
from weightzoo.incontext.heldout import corner_crops
from weightzoo.incontext.model import InContextNet, InContextSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_net() -> InContextNet:
    torch.manual_seed(0)
    return InContextNet(InContextSpec((8, 8), 32, True)).eval()


def _disk_task(name: str, n: int = 12, size: int = 32, groups: list[str] | None = None) -> EvalTask:
    """Bright disks on noise; label = the disk. images/labels [n, size, size]."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    xs, ys = [], []
    for _ in range(n):
        cy, cx = rng.uniform(10, size - 10, 2)
        r = rng.uniform(4, 8)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        xs.append(np.clip(0.2 + 0.6 * m + rng.normal(0, 0.05, m.shape), 0, 1))
        ys.append(m)
    x = torch.tensor(np.stack(xs), dtype=torch.float32)
    y = torch.tensor(np.stack(ys), dtype=torch.float32)
    return EvalTask(name, x, y, groups or [f"g{i}" for i in range(n)], "synthetic disks")


# ---- metrics ----------------------------------------------------------------------------------------
def test_mean_of_support_is_the_thresholded_pixel_mean() -> None:
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0]], bool)
    c = np.array([[1, 1, 0, 0]], bool)
    assert mean_of_support(np.stack([a, b, c])).tolist() == [[True, True, False, False]]  # 3/3, 2/3, 1/3, 0
    assert mean_of_support(np.stack([a, b])).tolist() == [
        [True, True, True, False]
    ]  # 0.5 counts as foreground
    assert mean_of_support(a[None].astype(np.float32)).tolist() == a.tolist()  # one mask: itself


def test_ged_with_two_references() -> None:
    a = np.zeros((8, 8), bool)
    a[:4] = True
    b = np.zeros((8, 8), bool)
    b[:, :4] = True  # IoU(a, b) = 16 / 48, d = 2/3
    d = 2 / 3
    assert ged(np.stack([a, b]), np.stack([a, b])) == pytest.approx(0.0, abs=1e-12)  # identical sets
    assert ged(np.stack([a, a]), a) == pytest.approx(0.0)  # one reference (2-D) still works
    # candidates {a}, raters {a, b}: 2 * d/2 - 0 - (2 d / 4) = d / 2
    assert ged(a[None], np.stack([a, b])) == pytest.approx(math.sqrt(d / 2))
    # one reference: the rater term is 0, so a candidate set {b} vs {a} gives sqrt(2 d)
    assert ged(b[None], a[None]) == pytest.approx(math.sqrt(2 * d))
    empty = np.zeros((8, 8), bool)
    assert ged(empty[None], empty[None]) == 0.0  # two empty masks: d = 0


# ---- splits -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_queries", [1, 5, 12])
def test_split_never_puts_a_group_on_both_sides(seed: int, n_queries: int) -> None:
    sizes = [3, 5, 2, 8, 1, 4, 6, 3]  # uneven groups: a truncating split would cut one
    groups = [f"child{i}" for i, k in enumerate(sizes) for _ in range(k)]
    task = _disk_task("wbc-cell", len(groups), groups=groups)
    q, pool = split_queries(task, n_queries, seed)
    assert sorted(q.tolist() + pool.tolist()) == list(range(len(groups)))
    assert not {groups[i] for i in q} & {groups[i] for i in pool}
    assert len(q) >= min(n_queries, len(groups) // 3)
    q2, _ = split_queries(task, n_queries, seed)
    assert q.tolist() == q2.tolist()  # seeded


# ---- loaders: synthetic folders (always run) and the real data (skipped without it) ------------------
def _save(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def test_chase_loader_on_a_fake_folder(tmp_path: Path) -> None:
    src = tmp_path / "chasedb1"
    src.mkdir()
    rng = np.random.default_rng(0)
    for child in ("01", "02"):
        for eye in "LR":
            _save(src / f"Image_{child}{eye}.jpg", rng.integers(0, 255, (40, 44, 3), dtype=np.uint8))
            m = np.zeros((40, 44), np.uint8)
            m[:, 10:14] = 255  # a vertical vessel in the left crops only
            _save(src / f"Image_{child}{eye}_1stHO.png", m)
            m[:, 14:16] = 255  # observer 2 draws it a little wider
            _save(src / f"Image_{child}{eye}_2ndHO.png", m)
    t = load_eval_task("chase-vessels", tmp_path, 16, tmp_path / "cache")
    assert t.images.shape == (16, 16, 16) and t.labels.shape == (16, 16, 16)
    assert t.raters is not None and t.raters.shape == (16, 1, 16, 16)
    assert t.groups == ["child01"] * 8 + ["child02"] * 8  # both eyes of a child: one group
    assert set(t.labels.unique().tolist()) <= {0.0, 1.0} and set(t.raters.unique().tolist()) <= {0.0, 1.0}
    assert t.labels[0].sum() > 0 and t.labels[1].sum() == 0  # top-left crop has the vessel, top-right not
    assert (t.raters[:, 0].sum() > t.labels.sum()).item()  # observer 2 kept aligned, not a copy
    assert corner_crops(40, 44) == [(0, 0, 20), (0, 24, 20), (20, 0, 20), (20, 24, 20)]
    (src / "Image_02R_2ndHO.png").unlink()
    with pytest.raises(InputError, match=r"Image_02R_2ndHO\.png"):
        load_eval_task("chase-vessels", tmp_path, 16, tmp_path / "cache")


def test_hc18_loader_groups_subjects_and_fills_outlines(tmp_path: Path) -> None:
    src = tmp_path / "hc18" / "training_set"
    src.mkdir(parents=True)
    yy, xx = np.mgrid[:54, :80]
    ring = np.abs(((yy - 27) / 20) ** 2 + ((xx - 40) / 30) ** 2 - 1) < 0.12  # an ellipse OUTLINE
    for stem in ("010_HC", "010_2HC", "011_HC"):
        _save(src / f"{stem}.png", (np.random.default_rng(1).random((54, 80)) * 255).astype(np.uint8))
        _save(src / f"{stem}_Annotation.png", (ring * 255).astype(np.uint8))
    t = load_eval_task("hc18-head", tmp_path, 32, tmp_path / "cache")
    assert t.images.shape == (3, 32, 32) and t.raters is None
    assert sorted(t.groups) == ["hc010", "hc010", "hc011"]  # NNN_2HC.png: the same subject as NNN_HC.png
    inside = ((yy - 27) / 20) ** 2 + ((xx - 40) / 30) ** 2 < 1
    assert t.labels[0].mean().item() == pytest.approx(inside.sum() / 80**2, abs=0.05)  # filled, padded square


@pytest.mark.realdata
def test_real_chase_and_hc18_loaders(shared_data: Path, tmp_path: Path) -> None:
    for sub in ("chasedb1", "hc18"):
        if not (shared_data / sub).is_dir():
            pytest.skip(f"{shared_data / sub} not found")
    chase = load_eval_task("chase-vessels", shared_data, 32, tmp_path, limit=16)  # two children, 4 eyes
    assert chase.images.shape == (16, 32, 32) and chase.raters is not None
    assert chase.raters.shape == (16, 1, 32, 32)
    assert chase.groups == ["child01"] * 8 + ["child02"] * 8
    a, b = chase.labels.bool(), chase.raters[:, 0].bool()
    assert 0.5 < 2 * (a & b).sum().item() / (a.sum() + b.sum()).item() < 0.95  # two real observers
    assert 0.01 < chase.labels.mean().item() < 0.2  # vessels survive the crops
    hc = load_eval_task("hc18-head", shared_data, 32, tmp_path, limit=6)
    assert hc.images.shape == (6, 32, 32) and set(hc.labels.unique().tolist()) == {0.0, 1.0}
    assert len(set(hc.groups)) == 6 and 0.03 < hc.labels.mean().item() < 0.5
    q, pool = split_queries(chase, 4, 0)
    assert not {chase.groups[i] for i in q} & {chase.groups[i] for i in pool}


# ---- errors -----------------------------------------------------------------------------------------
def test_unknown_task_and_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnknownNameError, match=r"unknown held-out task 'nope'.*chase-vessels"):
        load_eval_task("nope", tmp_path, 32, tmp_path)
    with pytest.raises(InputError, match=r"real-data folder not found.*--data"):
        load_eval_task("hc18-head", tmp_path / "absent", 32, tmp_path)
    with pytest.raises(InputError, match=r"hc18.*folder not found.*--data"):
        load_eval_task("hc18-head", tmp_path, 32, tmp_path)  # root exists, hc18/ does not
    assert main(["incontext", "eval", "--heldout", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown held-out task 'nope'" in capsys.readouterr().err
    rc = main(["incontext", "eval", "--heldout", "hc18-head", "--data", str(tmp_path / "absent")])
    err = capsys.readouterr().err
    assert rc == 2 and "absent" in err and "--data" in err


# ---- curves and summary -----------------------------------------------------------------------------
def test_curves_on_a_tiny_net_report_skipped_sizes(tmp_path: Path) -> None:
    net = _tiny_net()
    task = _disk_task("wbc-cell", 12)  # a real task's name, so it enters the mean; 4 queries, pool 8
    st = EvalSettings(
        support_sizes=(1, 2, 4, 16),
        repeats=2,
        n_queries=4,
        ensemble=2,
        candidates=3,
        candidate_sizes=(2,),
        seed=0,
    )
    rows, skipped = evaluate_task(net, task, st, device="cpu")
    assert [r["S"] for r in rows] == [1, 2, 4] and skipped == [16]
    for r in rows:
        assert 0 <= r["single"] <= 1 and 0 <= r["mean-of-support"] <= 1 and 0 <= r["ensemble"] <= 1
        assert r["single-baseline"] == pytest.approx(r["single"] - r["mean-of-support"])
    assert "GED" in rows[1] and "GED" not in rows[0]  # candidates at S = 2 only
    rows2, _ = evaluate_task(net, task, st, device="cpu")
    assert [r["single"] for r in rows2] == [r["single"] for r in rows]  # seeded draws
    phantom = _disk_task("phantom-canal", 12)
    res = run_evaluation(
        net,
        ["wbc-cell", "phantom-canal"],
        tmp_path / "ev",
        st,
        device="cpu",
        log=None,
        loaded={("wbc-cell", 32): task, ("phantom-canal", 32): phantom},
    )
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["task_info"][0]["skipped_sizes"] == [16] and saved["n_params"] > 0
    assert [m["tasks"] for m in saved["mean_rows"]] == [1, 1, 1]  # the phantom is not in the mean
    assert saved["mean_rows"][0]["single"] == pytest.approx(rows[0]["single"])
    md = (tmp_path / "ev" / "results.md").read_text()
    assert "skipped S = 16" in md and "MEAN over real held-out tasks" in md and "UniverSeg" in md
    assert (tmp_path / "ev" / "report.html").exists() and (
        tmp_path / "ev" / "figures" / "dice_vs_support.png"
    ).exists()
    assert results_markdown(res).count("### ") == 4  # two tasks, the mean, the goals


def _row(task: str, s: int, single: float, base: float) -> dict:
    return {"task": task, "S": s, "single": single, "mean-of-support": base, "single-baseline": single - base}


def test_summary_checks_pair_tasks_across_sizes() -> None:
    rows = [
        _row("wbc-cell", 4, 0.80, 0.50),
        _row("sct-gm", 4, 0.40, 0.20),
        _row("wbc-cell", 16, 0.85, 0.55),  # sct-gm has no S = 16: the raw mean jumps from 0.60 to 0.85
        _row("wbc-cell", 64, 0.83, 0.70),
        _row("phantom-canal", 16, 0.0, 0.9),  # not real: ignored
    ]
    means, checks = summarize(rows)
    assert [m["tasks"] for m in means] == [2, 1, 1]
    assert means[1]["paired-change"] == pytest.approx(0.05)  # wbc-cell 0.80 -> 0.85, not 0.60 -> 0.85
    assert means[0]["UniverSeg"] == 0.63 and means[2]["UniverSeg-ensemble"] == 0.717
    s16, margin, rising = checks
    assert s16["ok"] is True and "0.850" in s16["detail"]
    assert margin["ok"] is False and "S = 64: +0.130" in margin["detail"]
    assert rising["ok"] is False and "S = 16 -> 64 by 0.020" in rising["detail"]
    _, none = summarize([_row("wbc-cell", 1, 0.5, 0.4)])
    assert [c["ok"] for c in none] == [None, None, None]
