"""Uncertainty (issue 13): maps, metrics against hand-built cases and MONAI, seeded MC dropout, exact
TTA inverses, maps on the input grid, evaluate --uncertainty, multi-rater phantoms and GED."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from weightzoo.cli import main
from weightzoo.data.slices import Preprocessing, load_slices
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.errors import InputError, ModelError
from weightzoo.nets.unet import ArchSpec, build_network
from weightzoo.segmenter import NetSegmenter, load_model, save_model
from weightzoo.uncertainty.maps import binary_entropy, uncertainty_maps
from weightzoo.uncertainty.metrics import (
    auroc,
    best_candidate_dice,
    boundary_band,
    calibration,
    ged,
    ueo,
)
from weightzoo.uncertainty.sources import TTA, MCDropout, dihedral, parse_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_maps_on_hand_built_samples() -> None:
    same = torch.full((5, 2, 3), 0.8)
    m = uncertainty_maps(same)
    assert torch.allclose(m["var"], torch.zeros(2, 3)) and torch.allclose(
        m["mi"], torch.zeros(2, 3), atol=1e-6
    )
    assert torch.allclose(m["entropy"], binary_entropy(torch.tensor(0.8)).expand(2, 3))
    split = torch.tensor([0.0, 1.0])[:, None]  # two samples that disagree completely
    m = uncertainty_maps(split)
    assert m["mean"].item() == 0.5 and m["var"].item() == 0.25
    assert m["entropy"].item() == pytest.approx(1.0) and m["mi"].item() == pytest.approx(1.0, abs=1e-5)


def _ece_by_hand(p: np.ndarray, y: np.ndarray, bins: int = 20) -> tuple[float, float, float]:
    idx = np.minimum((p * bins).astype(int), bins - 1)
    gaps, counts = [], []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            gaps.append(abs(p[sel].mean() - y[sel].mean()))
            counts.append(sel.sum())
    gaps, counts = np.array(gaps), np.array(counts)
    return float((gaps * counts).sum() / counts.sum()), float(gaps.mean()), float(gaps.max())


def test_calibration_and_auroc_agree_with_hand_computation() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((3, 16, 16)).astype(np.float32)
    y = rng.random((3, 16, 16)) < p**2  # miscalibrated on purpose
    ours = calibration(p, y)
    ece, ace, mce = _ece_by_hand(p.ravel().astype(np.float64), y.ravel().astype(np.float64))
    assert ours["ece"] == pytest.approx(ece, abs=1e-6)
    assert ours["ace"] == pytest.approx(ace, abs=1e-6)
    assert ours["mce"] == pytest.approx(mce, abs=1e-6)
    score, err = rng.random(500), rng.random(500) < 0.3
    u = mannwhitneyu(score[err], score[~err]).statistic / (err.sum() * (~err).sum())
    assert auroc(score, err) == pytest.approx(u, abs=1e-6)
    assert math.isnan(auroc(score, np.zeros(500, bool)))  # no error pixel: undefined


def test_band_ueo_ged_best_dice_on_hand_built_cases() -> None:
    ref = np.zeros((1, 20, 20), bool)
    ref[0, 5:15, 5:15] = True
    band = boundary_band(ref, 2)
    assert band[0, 10, 10] == 0 and band[0, 5, 10] and band[0, 3, 10] and not band[0, 2, 10]
    assert band.sum() == 14 * 14 - 4 * 3 - 6 * 6  # city-block distance ≤ 2: each outer corner loses 3 px
    err = np.zeros((20, 20), bool)
    err[2:4] = True
    assert ueo(err.astype(float), err) == pytest.approx(1.0)
    assert ueo((~err).astype(float), err) == pytest.approx(0.0)
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[:1] = True, True  # IoU(a, b) = 1/2 -> d = 1/2
    assert ged([a], [a]) == 0.0
    assert ged([a], [a, b]) == pytest.approx(0.25)  # 2·(0 + ½)/2 − 0 − (0 + ½ + ½ + 0)/4
    assert best_candidate_dice([a, b], [a, b]) == 1.0
    assert best_candidate_dice([a], [b]) == pytest.approx(2 / 3)


def test_dihedral_inverses_are_exact_and_tta_of_a_pointwise_model_is_its_prediction() -> None:
    x = torch.randn(2, 3, 8, 8)
    for i in range(8):
        assert torch.equal(dihedral(dihedral(x, i), i, inverse=True), x)
    assert len({dihedral(x, i).numpy().tobytes() for i in range(8)}) == 8

    class Pointwise:
        tasks, name = ["t"], "pointwise"

        def predict_batch(self, images: np.ndarray) -> np.ndarray:
            return 1 / (1 + np.exp(-np.asarray(images)))

    imgs = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    samples = TTA(Pointwise(), 8).samples(imgs)
    assert samples.shape == (8, 2, 1, 8, 8)
    assert all(torch.equal(samples[i], samples[0]) for i in range(8))
    with pytest.raises(InputError):
        TTA(Pointwise(), 9)


def _dropout_model(folder: Path, p: float = 0.2) -> Path:
    spec = ArchSpec.preset("tiny", 1, 2, dropout=p)
    return save_model(
        folder, build_network(spec, seed=0), spec, ["cord", "gm"], Preprocessing(size=(32, 32)), 1.0
    )


def test_mc_dropout_is_seeded_and_needs_dropout(tmp_path: Path) -> None:
    seg = load_model(_dropout_model(tmp_path / "m"), "cpu")
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    a, b = MCDropout(seg, 4, seed=1).samples(x), MCDropout(seg, 4, seed=1).samples(x)
    c = MCDropout(seg, 4, seed=2).samples(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # the passes differ
    assert not any(m.training for m in seg.net.modules())  # dropout is off again afterwards
    plain = ArchSpec.preset("tiny", 1, 1)
    with pytest.raises(ModelError, match="no dropout"):
        MCDropout(NetSegmenter(build_network(plain), plain, ["cord"], Preprocessing()), 4)
    for bad in ("mc", "mc:0", "foo:3", "mc:x"):
        with pytest.raises(InputError):
            parse_source(bad)


@pytest.fixture(scope="module")
def rater_dataset(tmp_path_factory):
    return make_phantom_dataset(
        tmp_path_factory.mktemp("raters"), sites=2, subjects_per_site=5, size=32, n_slices=4, raters=2
    )


def test_phantom_raters_are_plausible_and_leave_the_dataset_unchanged(rater_dataset, tmp_path: Path) -> None:
    ds = rater_dataset
    assert ds.n_raters == 2
    plain = make_phantom_dataset(tmp_path, sites=2, subjects_per_site=5, size=32, n_slices=4)
    case = ds.cases()[0]
    for a, b in (
        (ds.image_files(case)[0], plain.image_files(case)[0]),
        (ds.label_file(case), plain.label_file(case)),
    ):
        assert np.array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    ref = load_slices(ds, ["cord"], cases=ds.cases()).labels.astype(bool)
    for r in (1, 2):
        other = load_slices(ds, ["cord"], cases=ds.cases(), rater=r).labels.astype(bool)
        d = 2 * (ref & other).sum() / (ref.sum() + other.sum())
        assert 0.8 < d < 1.0  # boundaries differ, the structure is the same
    with pytest.raises(InputError, match="extra rater"):
        ds.rater_label_file(case, 3)


def test_segment_and_evaluate_with_uncertainty(rater_dataset, tmp_path: Path, capsys) -> None:
    model = _dropout_model(tmp_path / "m")
    img = next(iter(rater_dataset.image_files(rater_dataset.cases()[0])))
    out = tmp_path / "out.nii.gz"
    assert main(["segment", "-i", str(img), "-m", str(model), "-o", str(out), "--uncertainty", "mc:3"]) == 0
    src = nib.load(img)
    for name in ("cord", "gm", "cord_mean", "cord_var", "cord_entropy", "cord_mi", "gm_mi"):
        f = tmp_path / f"out_{name}.nii.gz"
        im = nib.load(f)
        assert im.shape == src.shape and np.allclose(im.affine, src.affine), name
    ent = nib.load(tmp_path / "out_cord_entropy.nii.gz").get_fdata()
    assert ent.min() >= 0 and ent.max() <= 1 and ent.max() > 0
    capsys.readouterr()
    summ = tmp_path / "s.json"
    args = [
        "evaluate",
        "-m",
        str(model),
        "--dataset",
        str(rater_dataset.root),
        "--uncertainty",
        "tta:4",
        "-o",
        str(summ),
    ]
    assert main(args) == 0
    u = json.loads(summ.read_text())["uncertainty"]
    assert u["source"] == "tta" and u["samples"] == 4 and u["n_cases"] >= 2
    for key in ("dice", "ece", "ece_band", "ace", "mce", "brier", "nll", "auroc", "ueo", "ged", "best_dice"):
        assert key in u["mean"]["cord"], key
    capsys.readouterr()
    for extra, message in (
        (["--uncertainty", "mc"], "not SOURCE:N"),
        (["--uncertainty", "zoo:3"], "needs a zoo"),
    ):
        code = main(["evaluate", "-m", str(model), "--dataset", str(rater_dataset.root), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err


def test_zoo_ensemble_source(
    finetune_zoo: Path, phantom_base: Path, tiny_phantom_dataset, tmp_path: Path, capsys
) -> None:
    """zoo:K: the K best-val runs of the task at the site; maps written; too many asked is a clear error."""
    img = tiny_phantom_dataset.image_files(tiny_phantom_dataset.cases_in("test", ["A"])[0])[0]
    out = tmp_path / "z.nii.gz"
    base = [
        "segment",
        "-i",
        str(img),
        "-m",
        str(phantom_base),
        "-o",
        str(out),
        "--zoo",
        str(finetune_zoo),
        "--site",
        "A",
    ]
    assert main([*base, "--task", "cord", "--uncertainty", "zoo:2"]) == 0
    var = nib.load(tmp_path / "z_var.nii.gz").get_fdata()
    assert var.max() > 0  # two different runs disagree somewhere
    capsys.readouterr()
    assert main([*base, "--uncertainty", "zoo:2"]) == 2  # a 3-task model: which task?
    assert "add --task" in capsys.readouterr().err
    assert main([*base, "--task", "cord", "--uncertainty", "zoo:99"]) == 2
    assert "the zoo has" in capsys.readouterr().err
