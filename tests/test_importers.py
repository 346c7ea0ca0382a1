"""Importers (WBC, SCT/BIDS NIfTI folders, generic image+mask folders) and the `weightzoo data` CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import typer
from PIL import Image as PILImage
from typer.testing import CliRunner

from weightzoo.data.importers import (
    DataWarning,
    import_folder,
    import_nifti_folder,
    import_wbc,
    map_to_nearest,
)
from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, load_slices
from weightzoo.errors import InputError


def _nii(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)
    return path


def _volume_pair(
    folder: Path, stem: str, suffix: str = "_seg-manual", shape=(12, 10, 6), rng=None
) -> tuple[Path, Path]:
    rng = rng or np.random.default_rng(0)
    img = rng.normal(100, 10, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[4:8, 3:7, :] = 1
    return _nii(folder / f"{stem}.nii.gz", img), _nii(folder / f"{stem}{suffix}.nii.gz", mask)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# ---- WBC ------------------------------------------------------------------------------------------
def test_wbc_real_import(wbc_data, tmp_path):
    ds = import_wbc(wbc_data, tmp_path, limit=4)
    assert ds.root.name == "Dataset501_WBC"
    assert (ds.root / "imagesTr" / "wbc1_001_0000.png").exists() and (
        ds.root / "labelsTr" / "wbc1_001.png"
    ).exists()
    assert (ds.root / "imagesTr" / "wbc2_004_0000.png").exists() and not (
        ds.root / "imagesTr" / "wbc1_005_0000.png"
    ).exists()
    meta = json.loads((ds.root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"} and meta["file_ending"] == ".png"
    assert meta["labels"] == {"background": 0, "cytoplasm": 1, "nucleus": 2} and meta["numTraining"] == 8
    assert ds.tasks == {"nucleus": [2], "cell": [1, 2], "cytoplasm": [1]}
    assert ds.sites() == ["Dataset1", "Dataset2"] and ds.subject("wbc2_003") == "wbc2_003"
    assert set(meta["cell_types"].values()) <= {1, 2, 3, 4, 5} and len(meta["cell_types"]) == 8
    assert ds.n_files_per_case == 1 and ds.n_channels == 3
    # labels are the source mask mapped 0/128/255 -> 0/1/2
    src = np.asarray(PILImage.open(wbc_data / "Dataset 1" / "001.png"))
    lab = np.asarray(PILImage.open(ds.label_file("wbc1_001")))
    assert lab.shape == (120, 120) and np.array_equal(lab, np.searchsorted([0, 128, 255], src))
    img = np.asarray(PILImage.open(ds.image_files("wbc1_001")[0]))
    assert img.shape == (120, 120, 3) and np.array_equal(
        img, np.asarray(PILImage.open(wbc_data / "Dataset 1" / "001.bmp"))
    )
    ss = load_slices(ds, ["nucleus", "cell"], prep=Preprocessing("rgb", (64, 64), channels=3))
    assert ss.images.shape == (8, 3, 64, 64) and (ss.labels[:, 0] <= ss.labels[:, 1]).all()


def _fake_wbc(root: Path) -> None:
    rng = np.random.default_rng(0)
    for folder, n, stray in (("Dataset 1", 2, False), ("Dataset 2", 2, True)):
        (root / folder).mkdir(parents=True)
        for i in range(1, n + 1):
            rgb = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            PILImage.fromarray(rgb).save(root / folder / f"{i:03d}.bmp")
            mask = np.zeros((16, 16), np.uint8)
            mask[4:12, 4:12] = 128
            mask[6:10, 6:10] = 255
            if stray:
                mask[0, :3] = 7  # -> background
                mask[5, 5] = 200  # -> nucleus (255)
            _png(root / folder / f"{i:03d}.png", mask)
    (root / "Class Labels of Dataset 1.csv").write_text("image ID,class label\n1,3\n2,5\n")


def test_wbc_stray_values_one_warning(tmp_path):
    _fake_wbc(tmp_path / "wbc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = import_wbc(tmp_path / "wbc", tmp_path / "out", size=8)
    data_warnings = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(data_warnings) == 1
    assert "Dataset2: 8 pixels in 2 masks" in str(data_warnings[0].message)
    assert "Dataset1" not in str(data_warnings[0].message)
    assert ds.meta["import_notes"] == [str(data_warnings[0].message)]
    assert ds.meta["cell_types"] == {"wbc1_001": 3, "wbc1_002": 5}
    lab = np.asarray(PILImage.open(ds.label_file("wbc2_001")))
    assert lab.shape == (8, 8) and set(np.unique(lab)) == {0, 1, 2}


def test_map_to_nearest():
    idx, n = map_to_nearest(np.array([0, 7, 64, 100, 128, 200, 255]), [0, 128, 255])
    assert idx.tolist() == [0, 0, 0, 1, 1, 2, 2] and n == 4


def test_wbc_errors(tmp_path):
    with pytest.raises(InputError, match="WBC folder not found"):
        import_wbc(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="Dataset 1"):
        import_wbc(tmp_path / "empty", tmp_path / "out")
    _fake_wbc(tmp_path / "wbc")
    (tmp_path / "wbc" / "Dataset 2" / "002.png").unlink()
    with pytest.raises(InputError, match=r"002\.bmp: mask not found"):
        import_wbc(tmp_path / "wbc", tmp_path / "out")
    assert _leftovers(tmp_path / "out") == []  # the failed import left nothing behind


# ---- NIfTI folders -----------------------------------------------------------------------------
def test_sct_t2_import_keeps_shape_and_affine(sct_data, tmp_path):
    src = sct_data / "t2"
    with pytest.warns(DataWarning, match="without a '_seg-manual' mask skipped"):
        ds = import_nifti_folder(src, tmp_path, mask_suffix="_seg-manual", task="cord", site="t2")
    assert ds.cases() == ["t2"] and ds.sites() == ["t2"] and ds.tasks == {"cord": [1]}
    orig, orig_mask = nib.load(src / "t2.nii.gz"), nib.load(src / "t2_seg-manual.nii.gz")
    img, lab = nib.load(ds.image_files("t2")[0]), nib.load(ds.label_file("t2"))
    for out in (img, lab):
        assert out.shape == orig.shape == (60, 55, 52)
        assert np.allclose(out.affine, orig.affine, atol=1e-4)
        assert nib.aff2axcodes(out.affine) == ("P", "S", "R")
    assert np.array_equal(img.get_fdata(), orig.get_fdata())
    assert np.array_equal(lab.get_fdata() > 0, orig_mask.get_fdata() > 0)
    assert ds.meta["labels"] == {"background": 0, "cord": 1}
    assert any("skipped" in n for n in ds.meta["import_notes"])


def test_bids_derivatives_layout_and_subjects(tmp_path):
    src = tmp_path / "bids"
    rng = np.random.default_rng(1)
    for sub in ("sub-01", "sub-02"):
        img = rng.normal(size=(8, 8, 4)).astype(np.float32)
        _nii(src / sub / "anat" / f"{sub}_T2w.nii.gz", img)
        mask = np.zeros((8, 8, 4), np.uint8)
        mask[2:5, 3:6] = 1
        _nii(src / "derivatives" / "labels" / sub / "anat" / f"{sub}_T2w_label-SC_seg.nii.gz", mask)
    ds = import_nifti_folder(src, tmp_path / "out", mask_suffix="_label-SC_seg", site="siteX")
    assert ds.cases() == ["sub-01_T2w", "sub-02_T2w"]
    assert [ds.subject(c) for c in ds.cases()] == ["sub-01", "sub-02"] and ds.sites() == ["siteX"]


def test_mask_in_another_orientation_is_written_on_the_image_grid(tmp_path):
    """Image PSR on disk, mask LAS on disk, same voxel grid: the label comes out in PSR, voxel for voxel."""
    rng = np.random.default_rng(2)
    ras = np.zeros((6, 7, 5), np.uint8)
    ras[1:3, 2:5, 1:4] = 1
    aff_ras = np.diag([1.0, 1.0, 2.0, 1.0])
    img_ras = nib.Nifti1Image(rng.normal(size=ras.shape).astype(np.float32), aff_ras)
    psr = nib.orientations.axcodes2ornt(("P", "S", "R"))
    las = nib.orientations.axcodes2ornt(("L", "A", "S"))
    ras_o = nib.orientations.axcodes2ornt(("R", "A", "S"))
    img_psr = img_ras.as_reoriented(nib.orientations.ornt_transform(ras_o, psr))
    mask_las = nib.Nifti1Image(ras, aff_ras).as_reoriented(nib.orientations.ornt_transform(ras_o, las))
    (tmp_path / "src").mkdir()
    nib.save(img_psr, str(tmp_path / "src" / "x.nii.gz"))
    nib.save(mask_las, str(tmp_path / "src" / "x_seg.nii.gz"))
    ds = import_nifti_folder(tmp_path / "src", tmp_path / "out", mask_suffix="_seg")
    lab = nib.load(ds.label_file("x"))
    assert lab.shape == img_psr.shape and np.allclose(lab.affine, img_psr.affine, atol=1e-4)
    expected = (
        nib.Nifti1Image(ras, aff_ras).as_reoriented(nib.orientations.ornt_transform(ras_o, psr)).get_fdata()
    )
    assert np.array_equal(lab.get_fdata(), expected)


# b.nii.gz lacks a mask on purpose: its DataWarning is expected here
@pytest.mark.filterwarnings("ignore::weightzoo.data.importers.DataWarning")
def test_nifti_import_errors(tmp_path):
    with pytest.raises(InputError, match="input folder not found"):
        import_nifti_folder(tmp_path / "missing", tmp_path / "out")
    src = tmp_path / "src"
    _volume_pair(src, "a")
    _nii(src / "b.nii.gz", np.zeros((12, 10, 6), np.float32))  # image without a mask
    with pytest.raises(InputError, match=r"b\.nii\.gz: no mask 'b_seg-manual"):
        import_nifti_folder(src, tmp_path / "out", strict=True)
    _volume_pair(src, "c")
    (src / "c.nii.gz").unlink()  # a mask without its image
    with pytest.warns(DataWarning, match=r"1 mask\(s\) without an image ignored: c_seg-manual\.nii\.gz"):
        assert import_nifti_folder(src, tmp_path / "ok").cases() == ["a"]
    with pytest.raises(InputError, match="no image/mask pairs with mask suffix '_lesion'"):
        import_nifti_folder(src, tmp_path / "out", mask_suffix="_lesion")
    # shape mismatch
    _nii(src / "b_seg-manual.nii.gz", np.zeros((12, 10, 5), np.uint8))
    with pytest.raises(InputError, match=r"b_seg-manual\.nii\.gz: shape \(12, 10, 5\) differs"):
        import_nifti_folder(src, tmp_path / "out")
    # affine mismatch (shifted by 5 mm)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    _nii(src / "b_seg-manual.nii.gz", np.ones((12, 10, 6), np.uint8), shifted)
    with pytest.raises(InputError, match=r"b_seg-manual\.nii\.gz: affine differs"):
        import_nifti_folder(src, tmp_path / "out")
    # unreadable mask
    (src / "b_seg-manual.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match=r"b_seg-manual\.nii\.gz: cannot read NIfTI"):
        import_nifti_folder(src, tmp_path / "out")
    assert _leftovers(tmp_path / "out") == []  # failed imports leave nothing behind
    with pytest.raises(InputError, match="task name"):
        import_nifti_folder(src, tmp_path / "out", task="background")
    with pytest.raises(InputError, match="empty="):
        import_nifti_folder(src, tmp_path / "out", empty="drop")


def test_empty_masks_keep_skip_error(tmp_path):
    src = tmp_path / "src"
    for s in ("a", "b", "c"):
        _volume_pair(src, s)
    _nii(src / "c_seg-manual.nii.gz", np.zeros((12, 10, 6), np.uint8))
    with pytest.raises(InputError, match=r"c_seg-manual\.nii\.gz: mask is empty"):
        import_nifti_folder(src, tmp_path / "o1", empty="error")
    with pytest.warns(DataWarning, match="1 empty mask"):
        kept = import_nifti_folder(src, tmp_path / "o2")
    assert kept.cases() == ["a", "b", "c"]
    with pytest.warns(DataWarning, match=r"1 empty mask\(s\) skipped"):
        skipped = import_nifti_folder(src, tmp_path / "o3", empty="skip")
    assert skipped.cases() == ["a", "b"]


def test_existing_dataset_is_never_mixed(tmp_path):
    src = tmp_path / "src"
    _volume_pair(src, "a")
    d1 = import_nifti_folder(src, tmp_path / "out", name="Cord", dataset_id=510)
    with pytest.raises(InputError, match="dataset id 510 is already used by Dataset510_Cord"):
        import_nifti_folder(src, tmp_path / "out", name="Cord", dataset_id=510)
    d2 = import_nifti_folder(src, tmp_path / "out", name="Cord")
    assert d1.root.name == "Dataset510_Cord" and d2.root.name == "Dataset501_Cord"
    assert d1.cases() == ["a"] and _leftovers(tmp_path / "out") == ["Dataset501_Cord", "Dataset510_Cord"]


def test_soft_mask_thresholded_with_warning(tmp_path):
    src = tmp_path / "src"
    _volume_pair(src, "a")
    soft = np.zeros((12, 10, 6), np.float32)
    soft[2:6, 2:6] = 0.7
    soft[8:10, 2:6] = 0.3
    _nii(src / "a_seg-manual.nii.gz", soft)
    with pytest.warns(DataWarning, match="soft"):
        ds = import_nifti_folder(src, tmp_path / "out")
    assert (nib.load(ds.label_file("a")).get_fdata() > 0).sum() == 4 * 4 * 6


def test_site_by_folder_and_duplicate_names(tmp_path):
    src = tmp_path / "src"
    _volume_pair(src / "siteA", "scan")
    _volume_pair(src / "siteB", "scan")
    ds = import_nifti_folder(src, tmp_path / "out", site_by_folder=True)
    assert ds.cases() == ["scan", "scan_2"] and ds.sites() == ["siteA", "siteB"]


# ---- generic 2-D folders -----------------------------------------------------------------------
def test_import_folder_gray_png(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(3)
    for i in range(4):
        _png(src / f"img{i}.png", rng.integers(0, 255, (20, 24), dtype=np.uint8))
        m = np.zeros((20, 24), np.uint8)
        m[5:10, 5 + i : 12 + i] = 255
        _png(src / f"img{i}_mask.png", m)
    ds = import_folder(src, tmp_path / "out", task="blob", site="lab1")
    assert (
        ds.root.name == "Dataset501_src"
        and ds.file_ending == ".png"
        and ds.meta["channel_names"] == {"0": "gray"}
    )
    assert (ds.root / "imagesTr" / "img0_0000.png").exists() and (ds.root / "labelsTr" / "img0.png").exists()
    lab = np.asarray(PILImage.open(ds.label_file("img2")))
    assert set(np.unique(lab)) == {0, 1} and lab.sum() == 5 * 7
    assert np.array_equal(
        np.asarray(PILImage.open(ds.image_files("img2")[0])), np.asarray(PILImage.open(src / "img2.png"))
    )
    ss = load_slices(ds, ["blob"], prep=Preprocessing(size=(32, 32)))
    assert ss.images.shape == (4, 1, 32, 32)


def test_import_folder_tiff_keeps_range_and_rejects_mixed_channels(tmp_path):
    src = tmp_path / "src"
    img = np.linspace(0, 4000, 16 * 16, dtype=np.float32).reshape(16, 16)
    src.mkdir()
    tifffile.imwrite(src / "a.tif", img)
    m = np.zeros((16, 16), np.uint8)
    m[3:9, 3:9] = 1
    _png(src / "a_mask.png", m)
    ds = import_folder(src, tmp_path / "out")
    assert ds.file_ending == ".tif"
    assert np.allclose(tifffile.imread(ds.image_files("a")[0]), img)
    _png(src / "b.png", np.zeros((16, 16, 3), np.uint8))
    _png(src / "b_mask.png", m)
    with pytest.raises(InputError, match=r"b\.png: image has 3 channel\(s\), a\.tif has 1"):
        import_folder(src, tmp_path / "out2")


def test_import_folder_rejects_mixed_nifti_and_2d(tmp_path):
    src = tmp_path / "src"
    _volume_pair(src, "v", suffix="_mask")
    _png(src / "p.png", np.zeros((8, 8), np.uint8))
    _png(src / "p_mask.png", np.ones((8, 8), np.uint8))
    with pytest.raises(InputError, match="mixes NIfTI volumes and 2-D images"):
        import_folder(src, tmp_path / "out")


# ---- CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli():
    from weightzoo.cli import data as data_cli

    app = typer.Typer()
    data_cli.register(app)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def test_cli_synth_and_info(cli, tmp_path):
    res = cli(
        "data",
        "synth",
        "--out",
        tmp_path,
        "--sites",
        "3",
        "--subjects",
        "3",
        "--size",
        "32",
        "--slices",
        "2",
        "--seed",
        "1",
    )
    assert res.exit_code == 0, res.output
    root = tmp_path / "Dataset501_Phantom"
    assert str(root) in res.output.replace("\n", "")
    ds = RawDataset.open(root)
    assert len(ds.cases()) == 9 and ds.sites() == ["A", "B", "C"] and ds.meta["phantom"]["seed"] == 1
    res = cli("data", "info", root)
    assert res.exit_code == 0, res.output
    for word in ("site", "cases", "subjects", "cord", "lesion", "A", "B", "C", "all"):
        assert word in res.output
    res = cli("data", "info", tmp_path / "nope")
    assert res.exit_code != 0 and isinstance(res.exception, InputError)


def test_cli_import_nifti_and_folder(cli, tmp_path):
    src = tmp_path / "src"
    _volume_pair(src, "a", suffix="_seg-manual")
    _nii(src / "lonely.nii.gz", np.zeros((4, 4, 4), np.float32))
    res = cli(
        "data",
        "import-nifti",
        src,
        "--out",
        tmp_path / "out",
        "--task",
        "cord",
        "--site",
        "t2",
        "--name",
        "Cord",
    )
    assert res.exit_code == 0, res.output
    assert "Dataset501_Cord" in res.output and "warning" in res.output and "lonely.nii.gz" in res.output
    assert RawDataset.open(tmp_path / "out" / "Dataset501_Cord").sites() == ["t2"]
    res = cli("data", "import-nifti", src, "--out", tmp_path / "out", "--strict")
    assert isinstance(res.exception, InputError) and "lonely.nii.gz" in str(res.exception)
    res = cli(
        "data",
        "import-folder",
        src,
        "--mask-suffix",
        "_seg-manual",
        "--task",
        "roi",
        "--out",
        tmp_path / "out",
    )
    assert res.exit_code == 0, res.output
    assert RawDataset.open(tmp_path / "out" / "Dataset502_src").tasks == {"roi": [1]}


def test_cli_import_wbc(cli, wbc_data, tmp_path):
    res = cli("data", "import-wbc", wbc_data, tmp_path, "--limit", "2", "--size", "32")
    assert res.exit_code == 0, res.output
    ds = RawDataset.open(tmp_path / "Dataset501_WBC")
    assert len(ds.cases()) == 4 and np.asarray(PILImage.open(ds.label_file("wbc2_002"))).shape == (32, 32)
