"""Shared fixtures: the real-data folder (skipped when absent) and small phantom datasets.

Session-scoped datasets are shared by many tests: treat them as read-only (copy with
`shutil.copytree` into `tmp_path` before changing anything in them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from weightzoo.data.raw import RawDataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (the tests' machine is shared); use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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


# A tiny three-task base trained on every site, and a zoo of its fine-tunes (stored as deltas).
# Read-only, shared by the base/soup/delta-generator tests.
FINETUNE_GRID = {
    "tasks": ["cord", "gm", ["cord", "gm", "canal"]],
    "sites": "each",
    "seeds": 2,
    "trainable": ["all", "norm_seg"],
    "optimizer": "adam",
    "lr": 1e-3,
    "steps": 12,
    "batch_size": 4,
    "checkpoints": 2,
}


@pytest.fixture(scope="session")
def finetune_grid() -> dict:
    """The grid of `finetune_zoo`, without its `from`."""
    return dict(FINETUNE_GRID)


@pytest.fixture(scope="session")
def phantom_base(tiny_phantom_dataset: RawDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cord+gm+canal base on both sites of tiny_phantom_dataset (32 px, 60 Adam steps)."""
    import torch

    from weightzoo.train.config import TrainConfig
    from weightzoo.train.loop import train_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("base") / "base"
    cfg = TrainConfig(
        tasks=["cord", "gm", "canal"], preset="tiny", steps=60, batch_size=4, optimizer="adam", size=(32, 32)
    )
    train_model(tiny_phantom_dataset, cfg, out, progress=False)
    torch.set_num_threads(old)
    return out


@pytest.fixture(scope="session")
def finetune_zoo(tiny_phantom_dataset: RawDataset, phantom_base: Path, tmp_path_factory) -> Path:
    """FINETUNE_GRID from `phantom_base`: 3 task sets x 2 sites x 2 subsets x 2 seeds = 24 runs."""
    import torch

    from weightzoo.zoo.build import build_zoo

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ftzoo")
    build_zoo(
        tiny_phantom_dataset, {**FINETUNE_GRID, "from": str(phantom_base)}, root / "zoo", progress=False
    )
    torch.set_num_threads(old)
    return root / "zoo"


@pytest.fixture(scope="session")
def kill_build_after():
    """kill_build_after(dataset_root, grid_yaml, zoo, n, *extra): run `weightzoo zoo build` in a
    subprocess and SIGKILL it once at least n checkpoints are committed (fails if it ends first)."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    def run(dataset_root: Path, grid_yaml: Path, zoo: Path, n_min: int, *extra: str) -> None:
        cmd = [
            sys.executable,
            "-c",
            "import sys; from weightzoo.cli import main; sys.exit(main(sys.argv[1:]))",
            *("zoo", "build", "--dataset", str(dataset_root), "--grid", str(grid_yaml), "--zoo", str(zoo)),
            *("--no-shard", "--no-progress", *extra),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        n, deadline = 0, time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                with sqlite3.connect(zoo / "manifest.sqlite", timeout=1) as db:
                    n = db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
            except sqlite3.Error:
                n = 0
            if n >= n_min:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            f"the build ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    return run


@pytest.fixture(scope="session")
def alone_and_together():
    """alone_and_together(plans, datas, **batched_kw) -> ({(run_id, step): checkpoint} trained one by
    one, the same trained in one batch): what the batched = sequential tests compare."""
    import torch

    from weightzoo.zoo.batched import train_batched
    from weightzoo.zoo.runs import train_sequential

    def run(plans: list, datas: list, **batched_kw) -> tuple[dict, dict]:
        cpu = torch.device("cpu")
        alone: dict = {}
        for p, d in zip(plans, datas, strict=True):
            train_sequential(p, d, cpu, lambda c: alone.__setitem__((c.run_id, c.step), c))
        together: dict = {}
        train_batched(plans, datas, cpu, lambda c: together.__setitem__((c.run_id, c.step), c), **batched_kw)
        return alone, together

    return run
