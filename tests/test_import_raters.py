"""CHASE_DB1 with both observers: crops at full resolution, the second observer as an extra rater."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from weightzoo.cli import main
from weightzoo.data.import_raters import import_chasedb1
from weightzoo.data.slices import Preprocessing, load_slices
from weightzoo.errors import InputError


def test_chasedb1_two_observers(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "chasedb1"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    few = tmp_path / "src"
    few.mkdir()
    for f in sorted(src.glob("Image_01*")) + sorted(src.glob("Image_02L*")):  # two children, three eyes
        shutil.copy(f, few / f.name)
    ds = import_chasedb1(few, tmp_path / "out", tile=256)
    assert ds.n_raters == 1 and ds.sites() == ["chase"]
    assert len(ds.cases()) == 3 * (999 // 256) * (960 // 256)  # 3 x 3 crops per eye
    assert {ds.subject(c) for c in ds.cases()} == {"child01", "child02"}  # both eyes of a child: one subject
    prep = Preprocessing(normalization="rgb", size=(256, 256), channels=3)
    a = load_slices(ds, ["vessel"], prep=prep, cases=ds.cases()).labels.astype(bool)
    b = load_slices(ds, ["vessel"], prep=prep, cases=ds.cases(), rater=1).labels.astype(bool)
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert 0.6 < dice < 0.95  # two real observers: close, not the same
    assert 0.02 < a.mean() < 0.2  # vessels survive the import (no resize at full resolution)


def test_chasedb1_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(InputError, match=r"no Image_NNX\.jpg"):
        import_chasedb1(tmp_path, tmp_path / "out")
    from PIL import Image as PILImage

    PILImage.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "Image_01L.jpg")
    assert main(["data", "import-chasedb1", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "observer mask not found" in err and "Image_01L_1stHO.png" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
