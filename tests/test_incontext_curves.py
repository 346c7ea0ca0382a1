"""Thin-structure training tasks (weightzoo.incontext.curves) and fine-tuning from a model (`init`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from weightzoo import incontext
from weightzoo.cli import main
from weightzoo.errors import InputError
from weightzoo.incontext.curves import RealTextureCurves, SynthCurves, _distance_to_polylines
from weightzoo.incontext.tasks import build_sources
from weightzoo.incontext.train import InContextConfig, train_incontext


def test_polyline_distance_is_euclidean() -> None:
    # a horizontal line through the middle row of a 33 px grid (row 16), 3 px wide
    d, half = _distance_to_polylines(33, [(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), 3.0)])
    assert float(d[16].max()) == 0.0 and float(d[16 - 5, 10]) == pytest.approx(5.0)
    assert torch.all(half == 1.5)
    label = d <= half
    assert label.sum(0).tolist() == [3] * 33  # 3 px wide everywhere


@pytest.mark.parametrize("size", [64, 128])
def test_curve_tasks_are_thin_seeded_and_vary_per_image(size: int) -> None:
    src = SynthCurves(size)
    for seed in range(6):
        x, y, name = src.sample(3, torch.Generator().manual_seed(seed))
        x2, y2, _ = src.sample(3, torch.Generator().manual_seed(seed))
        assert name == "synth-curves" and x.shape == y.shape == (3, size, size)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert float(x.min()) >= 0 and float(x.max()) <= 1 and set(y.unique().tolist()) <= {0.0, 1.0}
        assert 0 < float(y.mean()) < 0.4
        assert not torch.equal(y[0], y[1])  # new instances per image, same recipe
        # thin: a 7x7 opening (erode then dilate, radius 3) removes most of the label
        opened = F.max_pool2d(-F.max_pool2d(-y[:, None], 7, 1, 3), 7, 1, 3)[:, 0]
        assert float(opened.sum()) < 0.5 * float(y.sum())


def test_curve_label_is_visible_in_the_image() -> None:
    x, y, _ = SynthCurves(64).sample(4, torch.Generator().manual_seed(1))
    for xi, yi in zip(x, y, strict=True):
        if yi.sum() > 0:  # the foreground's mean intensity differs from the nearby background's
            ring = (F.max_pool2d(yi[None, None], 7, 1, 3)[0, 0] > 0) & (yi == 0)
            assert abs(float(xi[yi > 0].mean() - xi[ring].mean())) > 0.02


def test_real_texture_curves_and_source_names(tmp_path: Path) -> None:
    bank = F.avg_pool2d(torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0)), 3, 1, 1)[:, 0]
    x, y, name = RealTextureCurves(bank).sample(4, torch.Generator().manual_seed(3))
    assert name == "real-texture-curves" and x.shape == y.shape == (4, 32, 32) and float(y.sum()) > 0
    (src,) = build_sources(["curves"], 32, tmp_path)
    assert isinstance(src, SynthCurves) and src.size == 32


def test_fine_tuning_starts_from_the_init_model(tmp_path: Path) -> None:
    base_cfg = InContextConfig.preset("tiny", steps=2, val_tasks=2)
    train_incontext(base_cfg, tmp_path / "base", log=None)
    base = incontext.load_model(tmp_path / "base", "cpu").state_dict()
    # lr ~ 0: the fine-tuned weights stay the base's, not a fresh init
    cfg = InContextConfig.preset(
        "tiny", steps=1, lr=1e-12, val_tasks=2, sources=["curves"], init=str(tmp_path / "base")
    )
    meta = train_incontext(cfg, tmp_path / "ft", log=None)
    tuned = incontext.load_model(tmp_path / "ft", "cpu").state_dict()
    assert all(torch.allclose(base[k], tuned[k], atol=1e-6) for k in base)
    assert meta["init"]["steps"] == 2 and len(meta["init"]["sha256"]) == 64
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["train"]["init"] == str(tmp_path / "base") and saved["init"] == meta["init"]
    fresh = InContextConfig.preset("tiny", steps=1, lr=1e-12, val_tasks=2, sources=["curves"])
    train_incontext(fresh, tmp_path / "fresh", log=None)
    other = incontext.load_model(tmp_path / "fresh", "cpu").state_dict()
    assert not all(torch.allclose(base[k], other[k]) for k in base)


def test_fine_tuning_errors(tmp_path: Path) -> None:
    train_incontext(InContextConfig.preset("tiny", steps=1, val_tasks=2), tmp_path / "base", log=None)
    wrong = InContextConfig.preset("tiny", features=[8, 16], steps=1, init=str(tmp_path / "base"))
    with pytest.raises(InputError, match="differs"):
        train_incontext(wrong, tmp_path / "ft", log=None)
    rc = main(
        [
            "incontext",
            "train",
            "--preset",
            "tiny",
            "--init",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2
