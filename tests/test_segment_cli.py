"""`weightzoo segment` and `weightzoo evaluate` through the CLI entry point (`weightzoo.cli.main`)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage
from scipy import ndimage

from weightzoo.data.io import save_nifti
from weightzoo.data.raw import RawDataset, RawDatasetWriter
from weightzoo.data.slices import Preprocessing
from weightzoo.nets.unet import ArchSpec, build_network
from weightzoo.segmenter import save_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
T2 = DATA / "sct_testing_data" / "t2" / "t2.nii.gz"
needs_t2 = pytest.mark.skipif(not T2.exists(), reason=f"real SCT data not found at {T2}")


def cli(args: list[str]) -> int:
    from weightzoo.cli import main

    return main([str(a) for a in args])


def make_model(
    folder: Path, tasks: tuple[str, ...] = ("cord",), channels: int = 1, normalization: str = "zscore"
) -> Path:
    """An untrained tiny U-Net model folder (enough for shapes, geometry and file handling)."""
    spec = ArchSpec.preset("tiny", input_channels=channels, num_classes=len(tasks))
    prep = Preprocessing(normalization=normalization, size=(32, 32), channels=channels)
    return save_model(folder, build_network(spec, seed=0), spec, list(tasks), prep, 0.0)


class IntensitySegmenter:
    """Predicts foreground where the raw intensity exceeds `cut` ('rgb' normalisation divides by 255)."""

    def __init__(self, cut: float, size: tuple[int, int], tasks: tuple[str, ...] = ("cord",)):
        self.tasks, self.cut = list(tasks), cut
        self.preprocessing = Preprocessing(normalization="rgb", size=size, channels=1)
        self.name, self.n_params, self.seconds_to_build = "intensity", 0, 0.0

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        p = (images[:, :1] * 255.0 > self.cut).astype(np.float32)
        return np.repeat(p, len(self.tasks), axis=1)

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_batch(image[None])[0]


# ---- NIfTI ----------------------------------------------------------------------------------------


@needs_t2
def test_segment_real_psr_volume_keeps_shape_affine_orientation(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model")
    out = tmp_path / "t2_seg.nii.gz"
    assert cli(["segment", "-i", T2, "-m", model, "-o", out, "--device", "cpu"]) == 0
    src, seg = nib.load(str(T2)), nib.load(str(out))
    assert seg.shape == src.shape == (60, 55, 52)
    assert np.allclose(seg.affine, src.affine) and nib.aff2axcodes(seg.affine) == ("P", "S", "R")
    assert int(seg.header["qform_code"]) == int(src.header["qform_code"])
    assert int(seg.header["sform_code"]) == int(src.header["sform_code"])
    data = np.asarray(seg.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}

    probs = tmp_path / "t2_prob.nii.gz"
    assert cli(["segment", "-i", T2, "-m", model, "-o", probs, "-thr", "0"]) == 0
    p = np.asarray(nib.load(str(probs)).dataobj)
    assert p.dtype == np.float32 and p.shape == src.shape
    assert p.min() >= 0.0 and p.max() <= 1.0 and len(np.unique(p)) > 2


@needs_t2
def test_segment_mask_lands_on_the_voxels_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no resizing (prep.size = the canonical slice shape) an intensity oracle's mask must equal
    # `data > cut` voxel for voxel in the file's own PSR orientation: any axis mix-up breaks this.
    seg = IntensitySegmenter(cut=300.5, size=(52, 60))
    monkeypatch.setattr("weightzoo.cli.segment.load_model", lambda folder, device="auto": seg)
    make_model(tmp_path / "model")
    out = tmp_path / "t2_seg.nii.gz"
    assert cli(["segment", "-i", T2, "-m", tmp_path / "model", "-o", out]) == 0
    expected = np.asarray(nib.load(str(T2)).dataobj) > 300.5
    got = np.asarray(nib.load(str(out)).dataobj).astype(bool)
    assert expected.any() and np.array_equal(got, expected)


def _two_blob_volume(tmp_path: Path) -> tuple[Path, np.ndarray]:
    vol = np.zeros((16, 16, 6), np.float32)
    vol[2:6, 2:6, 1:5] = 200.0  # 64 voxels
    vol[10:12, 10:12, 2:4] = 200.0  # 8 voxels, not touching
    big = np.zeros(vol.shape, bool)
    big[2:6, 2:6, 1:5] = True
    return save_nifti(tmp_path / "blobs.nii.gz", vol, np.diag([1.0, 1.0, 3.0, 1.0])), big


def test_largest_component_and_qc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img, big = _two_blob_volume(tmp_path)
    seg = IntensitySegmenter(cut=100.0, size=(16, 16))
    monkeypatch.setattr("weightzoo.cli.segment.load_model", lambda folder, device="auto": seg)
    make_model(tmp_path / "model")
    assert cli(["segment", "-i", img, "-m", tmp_path / "model", "-o", tmp_path / "all.nii.gz"]) == 0
    all_mask = np.asarray(nib.load(str(tmp_path / "all.nii.gz")).dataobj)
    assert ndimage.label(all_mask)[1] == 2  # both blobs without --largest
    args = [
        "segment",
        "-i",
        img,
        "-m",
        tmp_path / "model",
        "-o",
        tmp_path / "big.nii.gz",
        "--largest",
        "--qc",
        tmp_path / "qc",
    ]
    assert cli(args) == 0
    mask = np.asarray(nib.load(str(tmp_path / "big.nii.gz")).dataobj).astype(bool)
    assert ndimage.label(mask)[1] == 1 and np.array_equal(mask, big)
    qc = tmp_path / "qc" / "big_qc.png"
    with PILImage.open(qc) as im:
        assert im.format == "PNG"


def test_multitask_model_writes_one_file_per_task(tmp_path: Path) -> None:
    img, _ = _two_blob_volume(tmp_path)
    model = make_model(tmp_path / "model", tasks=("cord", "lesion"))
    assert cli(["segment", "-i", img, "-m", model, "-o", tmp_path / "out" / "seg.nii.gz"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg_cord.nii.gz", "seg_lesion.nii.gz"]
    assert cli(["segment", "-i", img, "-m", model, "-o", tmp_path / "one.nii.gz", "--task", "lesion"]) == 0
    assert nib.load(str(tmp_path / "one.nii.gz")).shape == (16, 16, 6)


def test_default_output_name_beside_the_input(tmp_path: Path) -> None:
    img, _ = _two_blob_volume(tmp_path)
    assert cli(["segment", "-i", img, "-m", make_model(tmp_path / "model")]) == 0
    assert (tmp_path / "blobs_seg.nii.gz").exists()


# ---- 2-D ------------------------------------------------------------------------------------------


def _rgb_png(tmp_path: Path) -> Path:
    rgb = np.random.default_rng(0).integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    path = tmp_path / "cell.png"
    PILImage.fromarray(rgb).save(path)
    return path


def test_segment_png_masks_and_probabilities(tmp_path: Path) -> None:
    png = _rgb_png(tmp_path)
    model = make_model(tmp_path / "model", channels=3, normalization="rgb")
    assert cli(["segment", "-i", png, "-m", model, "-o", tmp_path / "mask.png"]) == 0
    mask = np.asarray(PILImage.open(tmp_path / "mask.png"))
    assert mask.shape == (40, 48) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}

    assert cli(["segment", "-i", png, "-m", model, "-o", tmp_path / "prob.tif", "-thr", "0"]) == 0
    import tifffile

    prob = tifffile.imread(str(tmp_path / "prob.tif"))
    assert prob.dtype == np.float32 and prob.shape == (40, 48)
    assert prob.min() >= 0.0 and prob.max() <= 1.0 and len(np.unique(prob)) > 2

    assert (
        cli(
            [
                "segment",
                "-i",
                png,
                "-m",
                model,
                "-o",
                tmp_path / "prob.png",
                "-thr",
                "0",
                "--qc",
                tmp_path / "qc",
            ]
        )
        == 0
    )
    scaled = np.asarray(PILImage.open(tmp_path / "prob.png"))
    assert scaled.dtype == np.uint8 and abs(scaled.astype(float) / 255 - prob).max() <= 0.5 / 255 + 1e-6
    assert (tmp_path / "qc" / "prob_qc.png").exists()


# ---- evaluate CLI ---------------------------------------------------------------------------------


def test_evaluate_cli_writes_summary_and_prints_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = RawDatasetWriter(tmp_path, 501, "Cli", {"0": "T2"}, {"background": 0, "cord": 1}, ".nii.gz")
    for i in range(6):
        lab = np.zeros((16, 16, 4), np.uint8)
        lab[4:10, 5:11, 1:3] = 1
        w.add_case(f"c{i}", [lab * 100.0 + i], lab, site="AB"[i % 2], subject=f"s{i}")
    ds = w.finish()
    model = make_model(tmp_path / "model")
    assert cli(["evaluate", "--model", model, "--dataset", ds.root, "--split", "all"]) == 0
    summary = json.loads((model / "eval_all" / "summary.json").read_text())
    assert summary["n_cases"] == 6 and set(summary["per_site"]) == {"A", "B"}
    out = capsys.readouterr().out
    assert "cord" in out and "Dice" in out and "HD95" in out
    assert cli(["evaluate", "-m", model, "-d", ds.root, "--site", "A", "--out", tmp_path / "a.json"]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["sites"] == ["A"] and a["split"] == "test" and a["n_cases"] == 1


def test_segment_real_wbc_bmp(tmp_path: Path, wbc_data: Path) -> None:
    bmp = wbc_data / "Dataset 1" / "001.bmp"
    if not bmp.exists():
        pytest.skip(f"{bmp} not found")
    model = make_model(tmp_path / "model", channels=3, normalization="rgb")
    assert (
        cli(["segment", "-i", bmp, "-m", model, "-o", tmp_path / "001_seg.png", "--qc", tmp_path / "qc"]) == 0
    )
    with PILImage.open(bmp) as src:
        w, h = src.size
    mask = np.asarray(PILImage.open(tmp_path / "001_seg.png"))
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1}
    assert (tmp_path / "qc" / "001_seg_qc.png").exists()


def test_evaluate_on_the_phantom_with_a_multitask_model(
    tmp_path: Path, tiny_phantom_dataset: RawDataset
) -> None:
    from weightzoo.evaluate import evaluate_segmenter, write_summary
    from weightzoo.segmenter import load_model

    ds = tiny_phantom_dataset
    tasks = tuple(ds.tasks)
    seg = load_model(make_model(tmp_path / "model", tasks=tasks), device="cpu")
    s = evaluate_segmenter(seg, ds, split="test")
    assert s["n_cases"] == len(ds.cases_in("test")) and s["tasks"] == list(tasks)
    assert set(s["per_site"]) == set(ds.sites()) and set(s["foreground_mean"]) >= {"Dice", "HD95"}
    for rec in s["metric_per_case"]:
        assert set(rec["metrics"]) == set(tasks) and rec["site"] == ds.site(rec["case"])
    json.loads(write_summary(s, tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(c))
