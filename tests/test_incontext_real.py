"""In-context training data from real images: tiles, pools and their cache, real-texture tasks,
progressive resizing, and that the shipped model's output depends on the support it is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo import incontext
from weightzoo.errors import InputError, UnknownNameError
from weightzoo.incontext.realdata import (
    RealSuperpixel,
    RealTextureShapes,
    _tiles,
    real_pools,
    real_sources,
    texture_bank,
)
from weightzoo.incontext.tasks import TaskSampler, is_held_out
from weightzoo.incontext.train import InContextConfig, _resize_tasks, train_incontext


def test_tiles_cover_the_image_evenly() -> None:
    corners = list(_tiles(1000, 700, 300, 100))
    assert {s for *_, s in corners} == {300}
    assert min(y for y, _, _ in corners) == 0 and max(y for y, _, _ in corners) == 700
    assert max(x for _, x, _ in corners) == 400  # the last tile ends at the border
    assert len(list(_tiles(1000, 700, 300, 4))) == 4
    assert list(_tiles(200, 120, 300, 4)) == [(0, 0, 120), (80, 0, 120)]  # side = the short side


def test_real_texture_tasks_are_consistent_and_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.rand(5, 1, 32, 32, generator=g)
    bank = torch.nn.functional.avg_pool2d(bank, 3, 1, 1)[:, 0]  # some structure, 0..1
    for src in (RealTextureShapes(bank), RealSuperpixel(bank)):
        x, y, name = src.sample(4, torch.Generator().manual_seed(3))
        x2, y2, _ = src.sample(4, torch.Generator().manual_seed(3))
        assert name == src.name and x.shape == y.shape == (4, 32, 32)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert float(x.min()) >= 0 and float(x.max()) <= 1 and set(y.unique().tolist()) <= {0.0, 1.0}
        assert float(y.sum()) > 0  # every image of the task shows the target


def test_resize_tasks_keeps_labels_binary() -> None:
    x = torch.rand(2, 3, 64, 64)
    y = torch.zeros(2, 3, 64, 64)
    y[..., 10:30, 20:50] = 1
    xs, ys = _resize_tasks(x, y, 32)
    assert xs.shape == ys.shape == (2, 3, 32, 32)
    assert set(ys.unique().tolist()) == {0.0, 1.0}
    assert float(ys[..., 5:15, 10:25].mean()) == 1.0


def test_progressive_resizing_trains_and_resumes(tmp_path: Path) -> None:
    cfg = InContextConfig.preset(
        "tiny",
        size=32,
        warm_size=16,
        warm_fraction=0.5,
        steps=6,
        log_every=3,
        checkpoint_every=3,
        val_tasks=2,
    )
    train_incontext(cfg, tmp_path / "full", log=None)
    train_incontext(cfg, tmp_path / "cut", stop_after=2, log=None)
    train_incontext(cfg, tmp_path / "cut", log=None)
    a = incontext.load_model(tmp_path / "full", "cpu").state_dict()
    b = incontext.load_model(tmp_path / "cut", "cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="warm_size"):
        InContextConfig.preset("tiny", warm_size=15)
    with pytest.raises(InputError, match="warm_fraction"):
        InContextConfig.preset("tiny", warm_fraction=1.0)


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pool cache for the module: each real dataset is read once."""
    return tmp_path_factory.mktemp("real_cache")


def test_real_pools_cache_and_errors(shared_data: Path, real_cache: Path, tmp_path: Path) -> None:
    pools = real_pools("errsm", 32, real_cache, shared_data)
    assert list(pools) == ["errsm/cord/sagittal-T2"]
    x, y = pools["errsm/cord/sagittal-T2"]
    assert x.shape[1:] == (32, 32) and x.shape == y.shape and len(x) >= 20
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert list(real_cache.glob("real-errsm-32px-*.safetensors"))
    again = real_pools("errsm", 32, real_cache, tmp_path / "nowhere")  # from the cache: no data needed
    assert torch.equal(again["errsm/cord/sagittal-T2"][0], x)
    with pytest.raises(InputError, match="WEIGHTZOO_DATA"):
        real_pools("dsb2018", 32, tmp_path, tmp_path / "nowhere")
    with pytest.raises(UnknownNameError):
        real_pools("wbc", 32, real_cache, shared_data)


def test_real_sources_sample_training_tasks_only(shared_data: Path, real_cache: Path) -> None:
    sources = real_sources(["errsm", "totalseg"], 32, real_cache, shared_data)
    assert [s.name for s in sources] == ["real:errsm", "real:totalseg"]
    assert sources[0].share == 1.0 and sources[1].share == 3.0  # 152 organ tasks: capped
    for key in sources[1].keys:
        assert key.startswith(("totalseg/ct-", "totalseg/mr-"))
    x, _, names = TaskSampler(sources).sample(3, 4, torch.Generator().manual_seed(0))
    assert x.shape == (3, 4, 32, 32) and len(names) == 3
    bank = texture_bank([real_pools("errsm", 32, real_cache, shared_data)], limit=10)
    assert bank.shape == (10, 32, 32)
    # the real training data never touches the held-out evaluation tasks
    assert is_held_out("chase", "vessels") and is_held_out("hc18", "head") and is_held_out("sct", "rootlets")


def _disks(n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Images with one bright disk and one dark square; masks of the disk and of the square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    xs, disks, squares = [], [], []
    for _ in range(n):
        cy, cx = rng.uniform(0.25, 0.4, 2) * size
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= (0.12 * size) ** 2
        sy, sx = (rng.uniform(0.6, 0.75, 2) * size).astype(int)
        square = np.zeros((size, size), bool)
        square[sy : sy + size // 6, sx : sx + size // 6] = True
        img = 100 + 80 * disk - 60 * square + rng.normal(0, 5, (size, size))
        xs.append(img.astype(np.float32))
        disks.append(disk)
        squares.append(square)
    return xs, disks, squares


def test_shipped_model_output_follows_the_support_labels() -> None:
    """Swap the support masks (disk -> square) on the same support images: the prediction moves."""
    xs, disks, squares = _disks(9, 96, 1)
    query, support = xs[0], xs[1:]
    p_disk = incontext.segment(query, support, disks[1:])[0] >= 0.5
    p_square = incontext.segment(query, support, squares[1:])[0] >= 0.5

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))

    assert dice(p_disk, disks[0]) > dice(p_disk, squares[0])
    assert dice(p_square, squares[0]) > dice(p_square, disks[0])
    assert dice(p_disk, p_square) < 0.5


def test_no_real_data_folder_is_guessed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from weightzoo.incontext.heldout import resolve_data_root

    monkeypatch.delenv("WEIGHTZOO_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # even with a ../shared/data beside it, nothing is read without being named
    with pytest.raises(InputError, match=r"no real-data folder given.*WEIGHTZOO_DATA"):
        real_pools("errsm", 32, tmp_path / "cache")
    with pytest.raises(InputError, match=r"no real-data folder given.*--data"):
        resolve_data_root(None)
    monkeypatch.setenv("WEIGHTZOO_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
