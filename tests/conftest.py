"""Shared fixtures: the real-data folder (skipped when absent) and small phantom datasets.

Session-scoped datasets are shared by many tests: treat them as read-only (copy with
`shutil.copytree` into `tmp_path` before changing anything in them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from weightzoo.data.raw import RawDataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real SCT and WBC data, read-only); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see README: tests that need it are skipped)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sct_data(shared_data: Path) -> Path:
    """../shared/data/sct_testing_data; skips when absent."""
    p = shared_data / "sct_testing_data"
    if not p.is_dir():
        pytest.skip(f"SCT testing data not found at {p}")
    return p


@pytest.fixture(scope="session")
def wbc_data(shared_data: Path) -> Path:
    """../shared/data/wbc; skips when absent."""
    p = shared_data / "wbc"
    if not p.is_dir():
        pytest.skip(f"WBC data not found at {p}")
    return p


@pytest.fixture(scope="session")
def tiny_phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> RawDataset:
    """2 sites (A: T1-like, B: T2-like) x 6 subjects, 64 x 64 x 4 slices; tasks cord, gm, canal, lesion.

    Splits (by subject, per site): 4 train, 1 val, 1 test subjects per site. Read-only: shared.
    """
    from weightzoo.data.synth import make_phantom_dataset

    return make_phantom_dataset(
        tmp_path_factory.mktemp("phantom"), sites=2, subjects_per_site=6, size=64, n_slices=4, seed=0
    )


@pytest.fixture(scope="session")
def phantom_dataset_4sites(tmp_path_factory: pytest.TempPathFactory) -> RawDataset:
    """4 sites (A T1, B T2, C T2*, D PD-like) x 6 subjects, 64 x 64 x 4 slices. Read-only: shared."""
    from weightzoo.data.synth import make_phantom_dataset

    return make_phantom_dataset(
        tmp_path_factory.mktemp("phantom4"), sites=4, subjects_per_site=6, size=64, n_slices=4, seed=0
    )
