"""Core data modules: image I/O (io.py), the nnU-Net raw format and splits (raw.py), slices (slices.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from weightzoo.data.io import read_image, read_mask, write_2d, write_like
from weightzoo.data.raw import (
    SPLITS_FILE,
    RawDataset,
    RawDatasetWriter,
    make_splits,
    next_dataset_id,
    tasks_from_labels,
)
from weightzoo.data.slices import Preprocessing, binary_task_masks, load_slices, normalize_case
from weightzoo.errors import InputError, UnknownNameError

RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


def _reoriented(data: np.ndarray, affine: np.ndarray, codes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The RAS image (data, affine) stored on disk in orientation `codes`."""
    return nib.Nifti1Image(data, affine).as_reoriented(
        nib.orientations.ornt_transform(RAS, nib.orientations.axcodes2ornt(codes))
    )


@pytest.mark.parametrize("codes", [("P", "S", "R"), ("L", "A", "S"), ("R", "A", "S")])
def test_nifti_round_trip_keeps_shape_affine_and_voxels(tmp_path, codes):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 6, 5)).astype(np.float32)
    aff = np.diag([0.5, 0.8, 2.0, 1.0])
    aff[:3, 3] = [-10.0, 4.0, 30.0]
    disk = _reoriented(data, aff, codes)
    nib.save(disk, str(tmp_path / "in.nii.gz"))
    img = read_image(tmp_path / "in.nii.gz")
    assert img.is_volume and img.array.shape == (1, 7, 6, 5)  # canonical RAS
    assert np.allclose(img.array[0], data) and np.allclose(img.affine, aff)
    assert img.spacing == pytest.approx((0.5, 0.8, 2.0))
    mask = (img.array[0] > 0.5).astype(np.uint8)
    out = write_like(tmp_path / "out.nii.gz", mask, img)
    back = nib.load(str(out))
    assert back.shape == disk.shape and np.allclose(back.affine, disk.affine)
    assert nib.aff2axcodes(back.affine) == codes
    assert np.array_equal(back.get_fdata(), np.asarray(disk.dataobj) > 0.5)
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(read_mask(out, like=img), mask)  # and it reads back on the image's grid


def test_real_psr_t2_round_trip(sct_data, tmp_path):
    t2 = sct_data / "t2" / "t2.nii.gz"
    img = read_image(t2)
    assert img.array.shape == (1, 52, 60, 55)  # PSR 60x55x52 -> RAS
    seg = read_mask(sct_data / "t2" / "t2_seg-manual.nii.gz", like=img)
    out = nib.load(str(write_like(tmp_path / "seg.nii.gz", seg, img)))
    orig = nib.load(str(sct_data / "t2" / "t2_seg-manual.nii.gz"))
    assert out.shape == orig.shape and np.allclose(out.affine, orig.affine, atol=1e-4)
    assert np.array_equal(out.get_fdata(), orig.get_fdata())


def test_mask_grid_mismatch_errors(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.float32), np.eye(4)), str(tmp_path / "img.nii.gz"))
    img = read_image(tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 3), np.uint8), np.eye(4)), str(tmp_path / "small.nii.gz"))
    with pytest.raises(
        InputError, match=r"small\.nii\.gz: shape \(6, 6, 3\) differs from its image img\.nii\.gz"
    ):
        read_mask(tmp_path / "small.nii.gz", like=img)
    moved = np.eye(4)
    moved[2, 3] = 3.0
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.uint8), moved), str(tmp_path / "moved.nii.gz"))
    with pytest.raises(InputError, match=r"moved\.nii\.gz: affine differs"):
        read_mask(tmp_path / "moved.nii.gz", like=img)
    nib.save(nib.Nifti1Image(np.full((6, 6, 4), 0.5, np.float32), np.eye(4)), str(tmp_path / "soft.nii.gz"))
    with pytest.raises(InputError, match="non-integer"):
        read_mask(tmp_path / "soft.nii.gz")
    nib.save(nib.Nifti1Image(np.full((6, 6, 4), 300, np.int16), np.eye(4)), str(tmp_path / "big.nii.gz"))
    with pytest.raises(InputError, match=r"outside 0\.\.255"):
        read_mask(tmp_path / "big.nii.gz")


def test_unreadable_and_unsupported_files(tmp_path):
    with pytest.raises(InputError, match=r"nope\.nii\.gz: image not found"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not a nifti file")
    with pytest.raises(InputError, match=r"junk\.nii\.gz: cannot read NIfTI"):
        read_image(tmp_path / "junk.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), str(tmp_path / "full.nii.gz"))
    raw = gzip.decompress((tmp_path / "full.nii.gz").read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))  # truncated volume
    with pytest.raises(InputError, match=r"cut\.nii\.gz: cannot read NIfTI"):
        read_image(tmp_path / "cut.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "four.nii.gz"))
    with pytest.raises(InputError, match="4-D NIfTI"):
        read_image(tmp_path / "four.nii.gz")
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(InputError, match="unsupported file type"):
        read_image(tmp_path / "x.xyz")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"bad\.png: cannot read image"):
        read_image(tmp_path / "bad.png")


def test_2d_images_and_masks(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    PILImage.fromarray(rgb).save(tmp_path / "rgb.png")
    PILImage.fromarray(np.dstack([rgb, np.full((10, 12), 255, np.uint8)])).save(tmp_path / "rgba.png")
    PILImage.fromarray(rgb[..., 0]).save(tmp_path / "gray.bmp")
    for name, channels in (("rgb.png", 3), ("rgba.png", 3), ("gray.bmp", 1)):
        img = read_image(tmp_path / name)
        assert img.array.shape == (channels, 10, 12) and img.array.dtype == np.float32 and not img.is_volume
    assert np.array_equal(read_image(tmp_path / "rgb.png").array, np.moveaxis(rgb, -1, 0))
    prob = np.linspace(0, 1, 120, dtype=np.float32).reshape(10, 12)
    write_like(tmp_path / "prob.png", prob, read_image(tmp_path / "rgb.png"))
    back = np.asarray(PILImage.open(tmp_path / "prob.png"))
    assert back.dtype == np.uint8 and back.max() == 255 and back.min() == 0
    write_2d(tmp_path / "m.png", (prob > 0.5).astype(np.uint8))
    assert np.array_equal(read_mask(tmp_path / "m.png", like=read_image(tmp_path / "gray.bmp")), prob > 0.5)
    PILImage.fromarray(np.zeros((9, 12), np.uint8)).save(tmp_path / "short.png")
    with pytest.raises(InputError, match=r"short\.png: shape \(9, 12\) differs"):
        read_mask(tmp_path / "short.png", like=read_image(tmp_path / "gray.bmp"))


# ---- raw datasets and splits -------------------------------------------------------------------
def _dataset(parent: Path, subjects: dict[str, int], cases_per_subject: int = 2) -> RawDataset:
    """2-D PNG dataset: `subjects` = {site: number of subjects}; each subject has several cases."""
    w = RawDatasetWriter(
        parent, 600, "Toy", {"0": "gray"}, {"background": 0, "a": 1, "b": 2}, ".png", description="toy"
    )
    rng = np.random.default_rng(0)
    for site, n in subjects.items():
        for s in range(n):
            for k in range(cases_per_subject):
                lab = rng.integers(0, 3, (8, 8), dtype=np.uint8)
                w.add_case(
                    f"{site}_{s}_{k}",
                    [rng.integers(0, 255, (8, 8), dtype=np.uint8)],
                    lab,
                    site=site,
                    subject=f"{site}-sub{s}",
                )
    return w.finish(split_seed=0)


def test_splits_by_subject_stratified_by_site_and_stored(tmp_path):
    ds = _dataset(tmp_path, {"S1": 10, "S2": 5, "S3": 2})
    splits = ds.splits()
    subjects = {ds.subject(c) for c in ds.cases()}
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(subjects)  # disjoint, complete
    for split in ("train", "val", "test"):
        cases = ds.cases_in(split)
        assert all(ds.subject(c) in splits[split] for c in cases)
        # a subject's cases are never separated
        for c in cases:
            assert all(o in cases for o in ds.cases() if ds.subject(o) == ds.subject(c))
    for site in ("S1", "S2"):  # >= 3 subjects: every split has some
        assert all(ds.cases_in(split, [site]) for split in ("train", "val", "test"))
    assert len([s for s in splits["train"] if s.startswith("S1")]) == 6  # 60/20/20 of 10
    assert ds.cases_in("test", ["S3"]) == [] and len(ds.cases_in("train", ["S3"])) == 4  # small site: train
    stored = json.loads((ds.root / SPLITS_FILE).read_text())
    assert stored["by"] == "subject" and stored["train"] == splits["train"]
    assert RawDataset.open(ds.root).splits() == splits  # re-opened: same subjects
    others = [make_splits(ds, seed=k)["test"] for k in range(1, 6)]
    assert any(o != splits["test"] for o in others)  # the seed matters...
    assert make_splits(ds, seed=3) == make_splits(ds, seed=3)  # ...deterministically


def test_splits_created_when_absent_and_rejected_when_corrupt(tmp_path):
    ds = _dataset(tmp_path, {"S1": 3}, cases_per_subject=1)
    (ds.root / SPLITS_FILE).unlink()
    assert sum(len(v) for v in RawDataset.open(ds.root).splits().values()) == 3
    assert (ds.root / SPLITS_FILE).exists()
    (ds.root / SPLITS_FILE).write_text(json.dumps({"train": []}))
    with pytest.raises(InputError, match="'val' is a required property"):
        ds.splits()
    (ds.root / SPLITS_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        ds.splits()


def test_subject_in_two_sites_is_an_error(tmp_path):
    w = RawDatasetWriter(tmp_path, 601, "Bad", {"0": "gray"}, {"background": 0, "a": 1}, ".png")
    for case, site in (("c1", "S1"), ("c2", "S2")):
        w.add_case(case, [np.zeros((4, 4), np.uint8)], np.zeros((4, 4), np.uint8), site=site, subject="same")
    with pytest.raises(InputError, match="subject same appears in sites"):
        w.finish()


def test_tasks_from_labels_and_dataset_metadata(tmp_path):
    assert tasks_from_labels({"background": 0, "cord": 1, "gm": 2, "canal": [1, 2, 3]}) == {
        "cord": [1],
        "gm": [2],
        "canal": [1, 2, 3],
    }
    ds = _dataset(tmp_path, {"S1": 3}, cases_per_subject=1)
    meta = json.loads((ds.root / "dataset.json").read_text())
    assert {"channel_names", "labels", "numTraining", "file_ending", "sites", "subjects", "tasks"} <= set(
        meta
    )
    assert meta["numTraining"] == 3 and ds.tasks == {"a": [1], "b": [2]}
    del meta["tasks"]  # a plain nnU-Net dataset.json: tasks come from the labels
    (ds.root / "dataset.json").write_text(json.dumps(meta))
    plain = RawDataset.open(ds.root)
    assert plain.tasks == {"a": [1], "b": [2]} and plain.task_labels("b") == [2]
    with pytest.raises(UnknownNameError, match="unknown task 'c' — choose one of: a, b"):
        plain.task_labels("c")
    with pytest.raises(UnknownNameError, match="unknown site 'S9'"):
        plain.cases_in("train", ["S9"])
    with pytest.raises(UnknownNameError, match="unknown split"):
        plain.cases_in("training")


def test_open_errors(tmp_path):
    with pytest.raises(InputError, match="dataset folder not found"):
        RawDataset.open(tmp_path / "Dataset999_None")
    (tmp_path / "D").mkdir()
    with pytest.raises(InputError, match=r"dataset\.json not found"):
        RawDataset.open(tmp_path / "D")
    (tmp_path / "D" / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0}, "file_ending": ".png"})
    )
    with pytest.raises(InputError, match="'channel_names' is a required property"):
        RawDataset.open(tmp_path / "D")
    ds = _dataset(tmp_path, {"S1": 3}, cases_per_subject=1)
    (ds.root / "imagesTr" / "S1_0_0_0000.png").unlink()
    with pytest.raises(InputError, match=r"S1_0_0_0000\.png: image file of a labelled case is missing"):
        ds.image_files("S1_0_0")
    with pytest.raises(InputError, match="name"):
        RawDatasetWriter(tmp_path, 700, "bad name!", {"0": "x"}, {"background": 0}, ".png")
    with pytest.raises(InputError, match=r"outside 1\.\.999"):
        RawDatasetWriter(tmp_path, 1000, "ok", {"0": "x"}, {"background": 0}, ".png")


def test_next_dataset_id(tmp_path):
    assert next_dataset_id(tmp_path / "missing") == 501
    for name in ("Dataset501_A", "Dataset502_B", "Dataset504_C", "notadataset"):
        (tmp_path / name).mkdir()
    assert next_dataset_id(tmp_path) == 503 and next_dataset_id(tmp_path, start=1) == 1


# ---- slices ------------------------------------------------------------------------------------
def test_normalisation_and_task_masks():
    x = np.random.default_rng(0).normal(5, 3, (2, 8, 8, 3)).astype(np.float32)
    z = normalize_case(x, "zscore")
    assert np.allclose(z.mean((1, 2, 3)), 0, atol=1e-5) and np.allclose(z.std((1, 2, 3)), 1, atol=1e-4)
    p = normalize_case(x, "percentile")
    assert p.min() == 0 and p.max() == 1
    assert np.allclose(normalize_case(np.full((3, 2, 2), 255.0), "rgb"), 1.0)
    with pytest.raises(UnknownNameError):
        normalize_case(x, "minmax")
    lab = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
    m = binary_task_masks(lab, [[1, 2, 3], [2], [1, 2, 3, 4]])
    assert m.dtype == np.uint8 and m.shape == (3, 2, 3)
    assert m[0].tolist() == [[0, 1, 1], [1, 0, 0]] and m[1].sum() == 1 and m[2].sum() == 4


def test_preprocessing_round_trip():
    p = Preprocessing("percentile", (48, 32), 2, 1)
    assert Preprocessing.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(InputError, match="unknown preprocessing keys"):
        Preprocessing.from_dict({"size": [8, 8], "zoom": 2})


def test_load_slices_by_split_and_site(tiny_phantom_dataset):
    ds = tiny_phantom_dataset
    ss = load_slices(ds, ["canal", "gm"], split="test", sites=["B"], prep=Preprocessing(size=(32, 32)))
    assert (
        ss.images.shape == (4, 1, 32, 32)
        and ss.labels.shape == (4, 2, 32, 32)
        and ss.labels.dtype == np.uint8
    )
    assert ss.sites() == ["B"] and len(ss.cases()) == 1 and [m["slice"] for m in ss.meta] == [0, 1, 2, 3]
    assert ss.meta[0]["subject"] in ds.splits()["test"]
    assert (ss.labels[:, 1] <= ss.labels[:, 0]).all()  # gm inside canal, after resizing too
    assert len(ss.where(slice=2)) == 1 and len(ss.select([0, 1])) == 2
    with pytest.raises(InputError, match="channels"):
        load_slices(ds, ["cord"], split="val", prep=Preprocessing(channels=3))
    with pytest.raises(UnknownNameError, match="unknown task"):
        load_slices(ds, ["vertebra"], split="val")


def test_read_only_dataset_gets_the_default_split_in_memory(
    tiny_phantom_dataset: RawDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import weightzoo.data.raw as raw
    from weightzoo.errors import WeightzooWarning

    root = tmp_path / tiny_phantom_dataset.root.name
    shutil.copytree(tiny_phantom_dataset.root, root)
    (root / raw.SPLITS_FILE).unlink()

    def refuse(*a: object, **k: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(raw, "write_splits", refuse)
    with pytest.warns(WeightzooWarning, match="cannot store the default split"):
        got = RawDataset.open(root).splits()
    expected = raw.make_splits(RawDataset.open(root), seed=0)
    assert got == {k: list(expected[k]) for k in raw.SPLIT_NAMES} and all(got.values())
    assert not (root / raw.SPLITS_FILE).exists()
