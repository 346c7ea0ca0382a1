"""AxonDeepSeg SEM/TEM and DSB 2018 importers: tiling, labels, sites, subjects, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from weightzoo.cli import main
from weightzoo.data.import_microscopy import (
    DSB_MIN_SITE,
    dsb_modality,
    import_axondeepseg,
    import_dsb2018,
    tiles,
)
from weightzoo.data.io import read_image
from weightzoo.errors import InputError


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


def _axon_bids(root: Path, modality: str, subjects: list[str], hw: tuple[int, int]) -> None:
    """A tiny AxonDeepSeg BIDS folder: one image per subject, an axon disc inside a myelin ring."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    for i, sub in enumerate(subjects):
        stem = f"{sub}_sample-{i}_{modality}"
        _png(root / sub / "micr" / f"{stem}.png", rng.integers(0, 255, hw, dtype=np.uint8))
        r = np.hypot(yy - hw[0] / 2, xx - hw[1] / 2)
        axon, myelin = r < 10, (r < 16) & (r >= 9)  # one ring of pixels claimed by both
        lab = root / "derivatives" / "labels" / sub / "micr"
        _png(lab / f"{stem}_seg-axon-manual.png", (axon * 255).astype(np.uint8))
        _png(lab / f"{stem}_seg-myelin-manual.png", (myelin * 255).astype(np.uint8))


def test_tiles_are_centred_non_overlapping_and_cover_what_they_can() -> None:
    img = np.arange(70 * 100).reshape(70, 100)
    got = list(tiles(img, 32))
    assert [(r, c) for r, c, _ in got] == [(r, c) for r in range(2) for c in range(3)]
    assert all(t.shape == (32, 32) for _, _, t in got)
    assert got[0][2][0, 0] == img[3, 2]  # (70 - 64) // 2, (100 - 96) // 2: the border is split evenly
    assert got[-1][2][-1, -1] == img[3 + 63, 2 + 95]
    small = list(tiles(img[:20], 32))  # shorter than a tile: one crop of the whole height
    assert [t.shape for _, _, t in small] == [(20, 32)] * 3


def test_axondeepseg_import_labels_sites_subjects(tmp_path: Path) -> None:
    _axon_bids(tmp_path / "sem", "SEM", ["sub-rat1", "sub-rat2", "sub-rat3"], (64, 96))
    _axon_bids(tmp_path / "tem", "TEM", ["sub-m1", "sub-m2", "sub-m3"], (64, 64))
    with pytest.warns(UserWarning, match="both axon and myelin"):
        ds = import_axondeepseg([tmp_path / "sem", tmp_path / "tem"], tmp_path / "out", tile=32, size=16)
    assert ds.sites() == ["SEM", "TEM"]
    assert len(ds.cases()) == 3 * 2 * 3 + 3 * 2 * 2  # SEM 64x96 -> 2x3 crops, TEM 64x64 -> 2x2
    assert ds.tasks == {"axon": [2], "myelin": [1], "axonmyelin": [1, 2]}
    subjects_of = {}
    for case in ds.cases():
        subjects_of.setdefault(ds.subject(case), set()).add(ds.site(case))
    assert sorted(subjects_of) == ["sub-m1", "sub-m2", "sub-m3", "sub-rat1", "sub-rat2", "sub-rat3"]
    assert all(len(s) == 1 for s in subjects_of.values())
    splits = ds.splits()
    for sub in subjects_of:  # every crop of a subject in one split
        assert sum(sub in v for v in splits.values()) == 1
    # The crop at the centre of the disc holds axon (2) and myelin (1); sizes are the network's.
    case = next(c for c in ds.cases() if c.startswith("subrat1") and c.endswith("t01"))
    lab = read_image(ds.label_file(case)).array
    assert lab.shape[-2:] == (16, 16) and set(np.unique(lab)) == {0, 1, 2}


def test_axondeepseg_missing_mask_names_the_file(tmp_path: Path) -> None:
    _axon_bids(tmp_path / "sem", "SEM", ["sub-rat1"], (40, 40))
    next((tmp_path / "sem" / "derivatives").rglob("*myelin-manual.png")).unlink()
    with pytest.raises(InputError, match="mask not found") as e:
        import_axondeepseg([tmp_path / "sem"], tmp_path / "out", tile=32)
    assert "myelin-manual.png" in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("Dataset*"))


def test_dsb_modality_rule() -> None:
    dark = np.zeros((8, 8, 3), np.uint8)
    light = np.full((8, 8, 3), 200, np.uint8)
    stained = light.copy()
    stained[..., 2] = 120
    assert (dsb_modality(dark), dsb_modality(light), dsb_modality(stained)) == ("fluo", "bright", "stained")


def test_dsb_import_sites_pool_small_types(tmp_path: Path) -> None:
    src = tmp_path / "dsb"
    rng = np.random.default_rng(0)
    n_big = DSB_MIN_SITE + 1
    shapes = [(32, 32)] * n_big + [(48, 64)] * 2  # 2 images of a rare size -> 'fluo-other'
    for i, hw in enumerate(shapes):
        g = rng.integers(0, 60, hw, dtype=np.uint8)
        _png(src / "images" / f"{i:064x}.png", np.stack([g] * 3, -1))
        inst = np.zeros(hw, np.uint16)
        inst[4:12, 4:12], inst[14:20, 14:20] = 1, 2
        _png(src / "labels" / f"{i:064x}.png", inst)
    ds = import_dsb2018(src, tmp_path / "out", tile=32, size=16, per_site=5)
    assert ds.sites() == ["fluo-32x32", "fluo-other"]
    assert ds.tasks == {"nucleus": [1]}
    per_site = {s: {ds.subject(c) for c in ds.cases() if ds.site(c) == s} for s in ds.sites()}
    assert len(per_site["fluo-32x32"]) == 5 and len(per_site["fluo-other"]) == 2
    other = [c for c in ds.cases() if ds.site(c) == "fluo-other"]
    assert len(other) == 2 * 2  # 48x64 -> 1x2 crops of 32 px
    lab = read_image(ds.label_file(other[0])).array
    assert set(np.unique(lab)) <= {0, 1}


def test_import_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["data", "import-dsb2018", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "images/ and labels/" in err, err
    rc = main(["data", "import-axondeepseg", str(tmp_path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "SEM.png" in err, err


def test_real_axondeepseg_tem_imports(shared_data: Path, tmp_path: Path) -> None:
    ds = import_axondeepseg([shared_data / "axondeepseg_tem"], tmp_path, tile=300, size=32)
    assert ds.sites() == ["TEM"] and len(ds.cases()) == 21 * 4
    assert len({ds.subject(c) for c in ds.cases()}) == 10
    assert all(len(v) > 0 for v in ds.splits().values())
