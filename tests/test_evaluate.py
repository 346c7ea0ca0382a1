"""Metrics on hand-made masks, post-processing, and the nnU-Net-style summary of `evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from weightzoo.data.io import read_image
from weightzoo.data.raw import RawDataset, RawDatasetWriter
from weightzoo.data.slices import Preprocessing, load_slices
from weightzoo.evaluate import (
    case_metrics,
    dice,
    evaluate_segmenter,
    evaluate_slices,
    hd95,
    summarize,
    write_summary,
)
from weightzoo.evaluate.summary import grid_spacing
from weightzoo.postprocess import largest_component, threshold
from weightzoo.qc import pick_slices, write_overlay

# ---- metrics ------------------------------------------------------------------------------------


def _square(shape: tuple[int, int], r0: int, c0: int, side: int) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    m[r0 : r0 + side, c0 : c0 + side] = 1
    return m


def test_dice_iou_and_counts_of_two_overlapping_squares() -> None:
    ref = _square((10, 10), 2, 2, 4)  # 16 px
    pred = _square((10, 10), 2, 4, 4)  # shifted 2 columns: 8 px overlap
    m = case_metrics(pred, ref)
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (8, 8, 8, 100 - 24)
    assert (m["n_pred"], m["n_ref"]) == (16, 16)
    assert m["Dice"] == pytest.approx(2 * 8 / 32)
    assert m["IoU"] == pytest.approx(8 / 24)
    assert dice(pred, ref) == pytest.approx(m["Dice"])


def test_empty_masks_follow_nnunet_rules() -> None:
    empty = np.zeros((8, 8), np.uint8)
    both = case_metrics(empty, empty)
    assert math.isnan(both["Dice"]) and math.isnan(both["IoU"]) and math.isnan(both["HD95"])
    assert (both["TP"], both["FP"], both["FN"], both["TN"]) == (0, 0, 0, 64)
    one = _square((8, 8), 1, 1, 3)
    missed = case_metrics(empty, one)  # prediction empty: a real miss
    assert missed["Dice"] == 0.0 and missed["IoU"] == 0.0 and math.isnan(missed["HD95"])
    false_alarm = case_metrics(one, empty)
    assert false_alarm["Dice"] == 0.0 and math.isnan(false_alarm["HD95"])
    assert math.isnan(dice(empty, empty)) and dice(empty, empty, empty=1.0) == 1.0


def test_hd95_of_parallel_lines_is_their_offset_times_spacing() -> None:
    # Every point of one line is exactly k away from the other line: all surface distances equal k.
    k = 3
    a = np.zeros((16, 16), np.uint8)
    b = np.zeros_like(a)
    a[4, 2:14] = 1
    b[4 + k, 2:14] = 1
    assert hd95(a, b) == pytest.approx(k)
    assert hd95(a, b, spacing=(2.5, 0.7)) == pytest.approx(2.5 * k)
    # single voxels in 3-D, offset along the last axis with anisotropic spacing
    p, q = np.zeros((5, 5, 9), np.uint8), np.zeros((5, 5, 9), np.uint8)
    p[2, 2, 1], q[2, 2, 1 + k] = 1, 1
    assert hd95(p, q, spacing=(0.5, 0.5, 2.0)) == pytest.approx(2.0 * k)


def _hd95_brute_force(a: np.ndarray, b: np.ndarray) -> float:
    """Independent reference: surface = mask minus its erosion; symmetric 95th percentile distance."""
    ea = np.argwhere(a & ~ndimage.binary_erosion(a))
    eb = np.argwhere(b & ~ndimage.binary_erosion(b))
    d = cdist(ea, eb)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_hd95_of_squares_offset_by_k(k: int) -> None:
    # Shifting a 10 x 10 square by k columns moves its left/right sides by k; at least 5 % of the
    # surface points (those sides) are k away, none farther, so the 95th percentile is exactly k.
    a = _square((32, 32), 8, 8, 10).astype(bool)
    b = _square((32, 32), 8, 8 + k, 10).astype(bool)
    assert hd95(a, b) == pytest.approx(k)
    assert hd95(a, b, spacing=(1.0, 0.5)) == pytest.approx(0.5 * k)


def test_hd95_percentile_against_brute_force() -> None:
    # Shapes whose 90th, 95th and 100th percentile distances all differ (4.24, 4.47, 5.0 for the first).
    for a, b in [
        (_square((32, 32), 8, 8, 12), _square((32, 32), 11, 10, 6)),
        (_square((32, 32), 4, 4, 12), _square((32, 32), 9, 7, 12)),
    ]:
        assert hd95(a, b) == pytest.approx(_hd95_brute_force(a.astype(bool), b.astype(bool)))


def test_summarize_uses_nanmean_and_counts_valid_cases() -> None:
    recs = [{"Dice": 1.0}, {"Dice": math.nan}, {"Dice": 0.5}]
    s = summarize(recs)
    assert s["mean"]["Dice"] == pytest.approx(0.75)
    assert s["n_valid"]["Dice"] == 2
    assert s["sd"]["Dice"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert math.isnan(summarize([{"Dice": math.nan}])["mean"]["Dice"])


# ---- post-processing and QC ---------------------------------------------------------------------


def test_threshold_and_its_bounds() -> None:
    p = np.array([0.2, 0.5, 0.51, 0.9])
    assert threshold(p, 0.5).tolist() == [0, 0, 1, 1]
    assert threshold(p, 0.5).dtype == np.uint8
    from weightzoo.errors import InputError

    for bad in (0.0, 1.0, -0.1, 2):
        with pytest.raises(InputError):
            threshold(p, bad)


def test_largest_component_2d_3d_and_empty() -> None:
    m = np.zeros((12, 12), np.uint8)
    m[1:3, 1:3] = 1  # 4 px
    m[6:10, 6:10] = 1  # 16 px
    out = largest_component(m)
    assert out.sum() == 16 and out[7, 7] == 1 and out[1, 1] == 0
    # in 3-D, voxels that touch only across slices (diagonally) are one component
    v = np.zeros((4, 4, 3), np.uint8)
    v[0, 0, 0] = v[1, 1, 1] = v[2, 2, 2] = 1
    assert largest_component(v).sum() == 3
    assert largest_component(v, full_connectivity=False).sum() == 1
    assert largest_component(np.zeros((3, 3, 3))).sum() == 0


def test_qc_picks_foreground_slices_and_writes_png(tmp_path: Path) -> None:
    mask = np.zeros((8, 8, 10), np.uint8)
    mask[2:5, 2:5, 7] = 1
    mask[2:4, 2:4, 3] = 1
    assert pick_slices(mask, 2) == [3, 7]
    assert len(pick_slices(np.zeros((4, 4, 10)), 3)) == 3
    from weightzoo.data.io import save_nifti

    f = save_nifti(
        tmp_path / "img.nii.gz", np.random.default_rng(0).normal(size=(8, 8, 10)).astype(np.float32)
    )
    out = write_overlay(tmp_path / "qc" / "x.png", read_image(f), mask, n_slices=4, reference=mask)
    from PIL import Image as PILImage

    with PILImage.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 50


# ---- evaluate_segmenter -------------------------------------------------------------------------

SHAPE = (20, 24, 5)  # canonical X, Y, Z; slices along Z are 20 x 24
AFFINE = np.diag([0.5, 0.75, 2.0, 1.0])


class OracleSegmenter:
    """Predicts task k where the rgb-normalised input exceeds cutoffs[k]: exact when images = labels * 50."""

    def __init__(self, tasks: list[str], cutoffs: list[float], prep: Preprocessing, empty: bool = False):
        self.tasks, self.cutoffs, self.preprocessing, self.empty = tasks, cutoffs, prep, empty
        self.name, self.n_params, self.seconds_to_build = "oracle", 0, 0.0

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        x = images[:, :1]
        out = np.concatenate([(x > c) for c in self.cutoffs], 1).astype(np.float32)
        return np.zeros_like(out) if self.empty else out

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_batch(image[None])[0]


def make_dataset(parent: Path, lesion_cases: tuple[int, ...] = (0, 2, 4)) -> RawDataset:
    """6 cases, sites A/B; cord = labels {1, 2}, lesion = label 2 in `lesion_cases` only."""
    w = RawDatasetWriter(
        parent, 501, "EvalTest", {"0": "T2"}, {"background": 0, "cord": 1, "lesion": 2}, ".nii.gz",
        tasks={"cord": [1, 2], "lesion": [2]},
    )  # fmt: skip
    for i in range(6):
        lab = np.zeros(SHAPE, np.uint8)
        lab[5 + i % 3 : 12, 6:14, 1:4] = 1
        if i in lesion_cases:
            lab[7:9, 8:10, 2] = 2
        w.add_case(f"case_{i}", [lab * 50.0], lab, site="AB"[i % 2], subject=f"sub-{i}", affine=AFFINE)
    return w.finish()


@pytest.fixture
def eval_ds(tmp_path: Path) -> RawDataset:
    return make_dataset(tmp_path)


PREP = Preprocessing(normalization="rgb", size=SHAPE[:2], axis=2, channels=1)  # no resize: exact oracle


def test_summary_of_an_oracle_is_perfect_and_per_case(eval_ds: RawDataset) -> None:
    seg = OracleSegmenter(["cord", "lesion"], [0.1, 0.3], PREP)
    s = evaluate_segmenter(seg, eval_ds, split=None)
    assert s["n_cases"] == 6 == len(s["metric_per_case"])  # one record per case (volume), not per slice
    assert set(s["per_site"]) == {"A", "B"} and s["per_site_n_cases"] == {"A": 3, "B": 3}
    for rec in s["metric_per_case"]:
        cord = rec["metrics"]["cord"]
        assert cord["TP"] + cord["FP"] + cord["FN"] + cord["TN"] == np.prod(SHAPE)
        assert cord["Dice"] == 1.0 and cord["HD95"] == 0.0 and cord["FP"] == 0
        label = np.asarray(nib.load(rec["reference_file"]).dataobj)
        assert cord["n_ref"] == int((label > 0).sum())
    lesion_dice = [r["metrics"]["lesion"]["Dice"] for r in s["metric_per_case"]]
    assert sum(math.isnan(d) for d in lesion_dice) == 3  # no lesion, none predicted: NaN, not 1 or 0
    assert s["mean"]["lesion"]["Dice"] == 1.0 and s["n_valid"]["lesion"]["Dice"] == 3
    assert s["foreground_mean"]["Dice"] == 1.0
    assert s["hd95_unit"] == "mm" and s["tasks"] == ["cord", "lesion"]


def test_summary_of_an_empty_predictor_and_strict_json(eval_ds: RawDataset, tmp_path: Path) -> None:
    seg = OracleSegmenter(["cord"], [0.1], PREP, empty=True)
    s = evaluate_segmenter(seg, eval_ds, split=None, sites=["B"])
    assert s["n_cases"] == 3 and s["sites"] == ["B"]
    assert s["mean"]["cord"]["Dice"] == 0.0 and math.isnan(s["mean"]["cord"]["HD95"])
    path = write_summary(s, tmp_path / "out" / "summary.json")

    def no_nan(tok: str) -> None:
        raise AssertionError(f"non-standard JSON constant {tok}")

    data = json.loads(path.read_text(), parse_constant=no_nan)
    assert data["mean"]["cord"]["HD95"] is None and data["mean"]["cord"]["Dice"] == 0.0
    assert data["metric_per_case"][0]["metrics"]["cord"]["HD95"] is None


def test_evaluate_uses_the_split_and_task_subset(eval_ds: RawDataset) -> None:
    seg = OracleSegmenter(["cord", "lesion"], [0.1, 0.3], PREP)
    s = evaluate_segmenter(seg, eval_ds, split="test", tasks=["cord"])
    test_subjects = set(eval_ds.splits()["test"])
    assert {r["subject"] for r in s["metric_per_case"]} == test_subjects
    assert list(s["mean"]) == ["cord"] and s["split"] == "test"
    from weightzoo.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="lesion2"):
        evaluate_segmenter(seg, eval_ds, tasks=["lesion2"])


def test_hd95_is_in_mm_of_the_preprocessed_grid(eval_ds: RawDataset) -> None:
    # Resizing 20 x 24 slices to 10 x 12 doubles the in-plane voxel size.
    prep = Preprocessing(normalization="rgb", size=(10, 12), axis=2, channels=1)
    assert grid_spacing(eval_ds, "case_0", prep) == ([2.0, 1.0, 1.5], "mm")


def test_grid_spacing_follows_the_orientation(tmp_path: Path) -> None:
    # PSR-like affine: on-disk axes (P, S, R) with sizes 0.5, 2.0, 0.8 mm
    aff = np.array([[0, 0, 0.8, 0], [-0.5, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]], float)
    w = RawDatasetWriter(tmp_path, 502, "Psr", {"0": "T2"}, {"background": 0, "cord": 1}, ".nii.gz")
    lab = np.zeros((12, 7, 9), np.uint8)
    lab[3:6, 2:5, 2:6] = 1
    w.add_case("c", [lab * 1.0], lab, affine=aff)
    ds = w.finish()
    prep = Preprocessing(size=(18, 24), axis=2)
    img = read_image(ds.image_files("c")[0])  # canonical spacing and shape through nibabel
    sp, sh = img.spacing, img.spatial_shape
    expected = [sp[2], sp[0] * sh[0] / 18, sp[1] * sh[1] / 24]
    assert grid_spacing(ds, "c", prep)[0] == pytest.approx(expected)
    assert sp == pytest.approx((0.8, 0.5, 2.0))


def test_evaluate_slices_matches_evaluate_segmenter(eval_ds: RawDataset) -> None:
    seg = OracleSegmenter(["cord"], [0.1], PREP)
    # a prediction that is off: shift the oracle's threshold so it misses the darker border
    seg.cutoffs = [0.25]
    by_dataset = evaluate_segmenter(seg, eval_ds, split=None)
    ss = load_slices(eval_ds, ["cord"], prep=PREP)
    by_slices = evaluate_slices(seg, ss)
    a = {r["case"]: r["metrics"]["cord"]["Dice"] for r in by_dataset["metric_per_case"]}
    b = {r["case"]: r["metrics"]["cord"]["Dice"] for r in by_slices["metric_per_case"]}
    assert a.keys() == b.keys()
    for case in a:
        assert a[case] == pytest.approx(b[case], nan_ok=True)
    assert by_slices["hd95_unit"] == "px"


def test_two_d_dataset_is_scored_per_image_in_original_pixels(tmp_path: Path) -> None:
    w = RawDatasetWriter(tmp_path, 503, "Flat", {"0": "gray"}, {"background": 0, "cell": 1}, ".png")
    for i in range(3):
        lab = _square((40, 30), 5 + i, 5, 12)
        w.add_case(f"img{i}", [(lab * 200).astype(np.uint8)], lab, site="A", subject=f"s{i}")
    ds = w.finish()
    prep = Preprocessing(normalization="rgb", size=(20, 15), axis=2, channels=1)
    s = evaluate_segmenter(OracleSegmenter(["cell"], [0.3], prep), ds, split=None)
    rec = s["metric_per_case"][0]["metrics"]["cell"]
    assert rec["TP"] + rec["FP"] + rec["FN"] + rec["TN"] == 20 * 15
    assert s["hd95_unit"] == "px" and grid_spacing(ds, "img0", prep) == ([2.0, 2.0], "px")
    assert s["mean"]["cell"]["Dice"] > 0.9
