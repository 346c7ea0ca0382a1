"""Base networks and fine-tune zoos: runs start from the base, frozen subsets stay frozen, deltas are
stored compactly and come back bit for bit, the CLI, bad inputs. Tiny preset, 32 px, one thread."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from weightzoo.cli import main
from weightzoo.errors import InputError
from weightzoo.zoo import Zoo
from weightzoo.zoo.base import DELTA_PREFIX, is_trainable, join_delta, load_base, split_delta
from weightzoo.zoo.grid import Grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_split_join_delta_is_bit_exact() -> None:
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(50, generator=g), "b": torch.randn(3, 4, generator=g), "c": torch.ones(2)}
    state = {
        "a": base["a"] + 1e-3 * torch.randn(50, generator=g),
        "b": base["b"].clone(),  # unchanged: not stored at all
        # cancellation far from the base: b + (v - b) != v in float32 for some entries
        "c": torch.tensor([1e-8, 3.0e7 + 1.0]),
    }
    stored = split_delta(state, base)
    assert "b" not in stored and DELTA_PREFIX + "b" not in stored
    assert DELTA_PREFIX + "a" in stored
    back = join_delta(stored, base)
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_trainable_subsets() -> None:
    assert is_trainable("encoder.stages.0.0.convs.0.conv.weight", "all")
    assert not is_trainable("encoder.stages.0.0.convs.0.conv.weight", "decoder")
    assert not is_trainable("encoder.stages.0.0.convs.0.conv.weight", "norm_seg")
    assert is_trainable("encoder.stages.0.0.convs.0.norm.weight", "norm_seg")
    assert is_trainable("decoder.seg_layers.1.bias", "norm_seg")
    assert is_trainable("decoder.transpconvs.0.weight", "decoder")
    with pytest.raises(InputError, match="unknown trainable"):
        is_trainable("x", "everything")


def test_finetune_zoo_stores_deltas_and_loads_bit_exactly(finetune_zoo: Path, phantom_base: Path) -> None:
    base = load_base(phantom_base)
    zoo = Zoo(finetune_zoo)
    runs = zoo.runs()
    assert len(runs) == 24 and all(r.status == "done" for r in runs)
    assert zoo.base_ids() == [base.base_id]
    assert (finetune_zoo / "bases" / f"{base.base_id}.safetensors").read_bytes() == base.weights
    for r in runs:
        assert r.info["base"] == base.base_id
        ckpts = zoo.checkpoints(run_id=r.run_id)
        start = zoo.load(ckpts[0])  # the init checkpoint IS the restricted base
        _, restricted = base.restricted(r.tasks)
        assert all(torch.equal(start[k], restricted[k]) for k in restricted)
        final = zoo.load(ckpts[-1])
        changed = {k for k in final if not torch.equal(final[k], restricted[k])}
        assert changed, "a fine-tune must change something"
        if r.config.get("trainable", "all") == "norm_seg":
            assert all(is_trainable(k, "norm_seg") for k in changed), changed
        # what the file holds: only the changed tensors, as deltas
        from safetensors.torch import load as st_load

        raw = st_load(zoo._read_blob(ckpts[-1]))
        assert {k.removeprefix(DELTA_PREFIX) for k in raw} == changed
    assert zoo.verify().ok


def test_delta_zoo_is_smaller_than_full_weights(finetune_zoo: Path) -> None:
    zoo = Zoo(finetune_zoo)
    norm_seg = [r for r in zoo.runs() if r.config.get("trainable", "all") == "norm_seg"]
    c = zoo.checkpoints(run_id=norm_seg[0].run_id)[-1]
    full = sum(v.numel() * 4 for v in zoo.load(c).values())
    assert c.nbytes < 0.5 * full


def test_a_rebuild_is_a_no_op_and_a_corrupt_base_is_found(
    finetune_zoo: Path, phantom_base: Path, finetune_grid: dict, tiny_phantom_dataset, tmp_path: Path
) -> None:
    from weightzoo.zoo.build import build_zoo

    zoo_dir = tmp_path / "zoo"
    shutil.copytree(finetune_zoo, zoo_dir)
    res = build_zoo(
        tiny_phantom_dataset, {**finetune_grid, "from": str(phantom_base)}, zoo_dir, progress=False
    )
    assert res.runs_trained == 0 and res.runs_skipped == 24
    f = next((zoo_dir / "bases").iterdir())
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    zoo = Zoo(zoo_dir)
    assert any("base" in p and "sha256" in p for p in zoo.verify().problems)
    from weightzoo.errors import ModelError

    with pytest.raises(ModelError, match="corrupt"):
        zoo.load(zoo.checkpoints()[0])


def test_grid_from_base_checks(tiny_phantom_dataset, phantom_base: Path) -> None:
    plans = Grid({"from": str(phantom_base), "tasks": ["cord"], "steps": 5}).expand(tiny_phantom_dataset)
    assert plans[0].base and plans[0].config.size == (32, 32)
    # the base changes the run id: same grid without a base plans other runs
    other = Grid({"tasks": ["cord"], "steps": 5, "size": 32, "preset": "tiny"}).expand(tiny_phantom_dataset)
    assert {p.run_id for p in plans}.isdisjoint({p.run_id for p in other})
    with pytest.raises(InputError, match="not an output of the base"):
        Grid({"from": str(phantom_base), "tasks": ["lesion"]}).expand(tiny_phantom_dataset)
    with pytest.raises(InputError, match="fixed by the base"):
        Grid({"from": str(phantom_base), "tasks": ["cord"], "preset": "small"})
    with pytest.raises(InputError, match="needs a base"):
        Grid({"tasks": ["cord"], "trainable": "norm_seg"})


def test_base_train_cli_and_bad_base(tiny_phantom_dataset, tmp_path: Path, capsys) -> None:
    out = tmp_path / "base"
    args = ["base", "train", "--dataset", str(tiny_phantom_dataset.root), "--tasks", "cord,canal"]
    args += ["--preset", "tiny", "--steps", "4", "--size", "32", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    b = load_base(out)
    assert b.tasks == ("cord", "canal") and b.meta["route"] == "base"
    assert sorted(b.meta["info"]["sites"]) == ["A", "B"]
    # a grid naming a folder that is not a model: one line, exit 2
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"from": str(tmp_path / "nope"), "tasks": ["cord"]}))
    capsys.readouterr()
    rc = main(
        [
            "zoo",
            "build",
            "--dataset",
            str(tiny_phantom_dataset.root),
            "--grid",
            str(tmp_path / "g.yaml"),
            "--zoo",
            str(tmp_path / "z"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err


def test_kill_9_mid_finetune_build_then_restart(
    finetune_zoo: Path,
    phantom_base: Path,
    finetune_grid: dict,
    tiny_phantom_dataset,
    tmp_path: Path,
    kill_build_after,
) -> None:
    """A real fine-tune zoo build is SIGKILLed mid-way, then run again: every planned checkpoint once,
    verify passes, and every checkpoint loads bit-identical to the uninterrupted build's."""
    grid = {**finetune_grid, "from": str(phantom_base)}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    zoo_dir = tmp_path / "zoo"
    kill_build_after(tiny_phantom_dataset.root, tmp_path / "grid.yaml", zoo_dir, 10)
    from weightzoo.zoo.build import build_zoo

    with Zoo(zoo_dir) as z:
        n_before = len(z.checkpoints())
    assert 10 <= n_before < 96
    res = build_zoo(tiny_phantom_dataset, grid, zoo_dir, progress=False, log=lambda s: None)
    assert res.checkpoints_committed == 96 - n_before
    done, ref = Zoo(zoo_dir), Zoo(finetune_zoo)
    assert done.verify().ok
    ids = sorted(c.ckpt_id for c in done.checkpoints())
    assert ids == sorted(c.ckpt_id for c in ref.checkpoints()) and len(ids) == 96
    for cid in ids:
        a, b = done.load(cid), ref.load(cid)
        assert all(torch.equal(a[k], b[k]) for k in b), cid
