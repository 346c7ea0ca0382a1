"""The zoo store (manifest + safetensors, atomic protocol, verify, queries, statistics) and the grid.

Store tests commit untrained tiny networks (no training), so they take milliseconds each.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.nets.unet import ArchSpec, build_network, real_state_dict
from weightzoo.zoo import PendingCheckpoint, Zoo
from weightzoo.zoo.grid import Grid, checkpoint_steps
from weightzoo.zoo.params import ParamLayout

SPEC1 = ArchSpec.preset("tiny", 1, 1)
SPEC2 = ArchSpec.preset("tiny", 1, 2)


def state(seed: int, spec: ArchSpec = SPEC1) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in real_state_dict(build_network(spec, seed=seed)).items()}


def make_zoo(path: Path, shard: bool = True, dtype: str = "float32") -> Zoo:
    """3 runs: r1 cord on A (train), r2 cord+gm on A+B (val), r3 gm on B (test); 3 checkpoints each."""
    z = Zoo(path, create=True, writable=True, shard=shard, dtype=dtype)
    z.add_run("r1", SPEC1, ["cord"], ["A"], "train", 3, {"lr": 0.01}, seed=0, dataset="D")
    z.add_run("r2", SPEC2, ["cord", "gm"], ["A", "B"], "val", 3, {"lr": 0.01}, seed=1, dataset="D")
    z.add_run("r3", SPEC1, ["gm"], ["B"], "test", 3, {"lr": 0.01}, seed=2, dataset="D")
    for rid, spec, tasks, seed in (
        ("r1", SPEC1, ["cord"], 0),
        ("r2", SPEC2, ["cord", "gm"], 10),
        ("r3", SPEC1, ["gm"], 30),
    ):
        items = [
            PendingCheckpoint(
                rid,
                step,
                "init" if step == 0 else "final" if step == 20 else "random",
                state(seed + step, spec),
                train_loss=1.0 - step / 40,
                val_loss=1.0 - step / 50,
                lr=0.01,
                # channel k's metric recorded under task k's name; the values encode (run, task, step)
                metrics={t: {"val_dice": seed / 100 + k / 10 + step / 1000} for k, t in enumerate(tasks)},
            )
            for step in (0, 7, 20)
        ]
        z.commit(items, done_runs=[rid])
    return z


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shard", [True, False])
def test_commit_load_and_queries(tmp_path: Path, shard: bool) -> None:
    z = make_zoo(tmp_path / "zoo", shard=shard)
    assert len(z.runs()) == 3 and all(r.status == "done" and r.n_checkpoints == 3 for r in z.runs())
    assert len(z.checkpoints()) == 9
    n_files = len({c.file for c in z.checkpoints()})
    assert n_files == (3 if shard else 9)
    # load gives back exactly what was committed
    ck = z.checkpoint("r2-0000007")
    loaded = z.load(ck)
    want = state(17, SPEC2)
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
    # filters: task (multi-task runs match each task), site, split, kind, metric range, order
    assert {c.run_id for c in z.checkpoints(task="cord")} == {"r1", "r2"}
    assert {c.run_id for c in z.checkpoints(task="gm", site="B")} == {"r2", "r3"}
    assert {c.run_id for c in z.checkpoints(split="test")} == {"r3"}
    assert [c.step for c in z.checkpoints(run_id="r1", kind="final")] == [20]
    # r2's gm channel (k=1): 0.10 + 0.1 + step/1000; r3's gm: 0.3 + step/1000
    gm = z.checkpoints(task="gm", metric="val_dice", min_value=0.2, max_value=0.31)
    assert {(c.run_id, c.step) for c in gm} == {("r2", 0), ("r2", 7), ("r2", 20), ("r3", 0), ("r3", 7)}
    cord = z.checkpoints(task="cord", metric="val_dice", min_value=0.2)  # r2's gm values are not cord's
    assert cord == []
    assert z.checkpoint("r2-0000020").metric("val_dice", "gm") == pytest.approx(0.1 + 0.1 + 0.02)
    assert z.checkpoint("r2-0000020").metric("val_dice", "cord") == pytest.approx(0.1 + 0.02)
    best = z.checkpoints(task="gm", order_by="-val_dice", limit=1)[0]
    assert (best.run_id, best.step) == ("r3", 20)
    assert [c.step for c in z.checkpoints(run_id="r1", metric="train_loss", max_value=0.9)] == [7, 20]
    assert [c.run_id for c in z.runs(task="cord", site="B")] == ["r2"]
    s = z.summary()
    assert (s["runs"], s["runs_done"], s["checkpoints"]) == (3, 3, 9)
    assert s["tasks"]["gm"]["val_dice_max"] == pytest.approx(0.32)
    assert z.verify().ok


def test_fp16_store_halves_disk(tmp_path: Path) -> None:
    z32, z16 = make_zoo(tmp_path / "a"), make_zoo(tmp_path / "b", dtype="float16")
    b32, b16 = z32.summary()["data_bytes"], z16.summary()["data_bytes"]
    assert b16 < 0.6 * b32
    a, b = z32.load("r1-0000007"), z16.load("r1-0000007")
    assert b["encoder.stages.0.0.convs.0.conv.weight"].dtype == torch.float32
    assert all(torch.allclose(a[k], b[k], atol=1e-3, rtol=1e-3) for k in a)
    assert z16.load("r1-0000007", dtype=None)["decoder.seg_layers.0.weight"].dtype == torch.float16


def test_commit_is_idempotent_and_done_needs_all_checkpoints(tmp_path: Path) -> None:
    z = Zoo(tmp_path / "zoo", create=True, writable=True)
    z.add_run("r", SPEC1, ["cord"], ["A"], "train", 3, {}, seed=0)
    assert not z.add_run("r", SPEC1, ["cord"], ["A"], "train", 3, {}, seed=0)  # same run: kept
    with pytest.raises(ModelError, match="another architecture"):
        z.add_run("r", SPEC2, ["cord", "gm"], ["A"], "train", 3, {})
    ck = [PendingCheckpoint("r", s, "random", state(s)) for s in (0, 5)]
    assert len(z.commit(ck)) == 2
    assert z.commit(ck) == []  # already committed: skipped, no duplicate
    with pytest.raises(ModelError, match="2 checkpoints, 3 planned"):
        z.finish_run("r")
    z.commit([PendingCheckpoint("r", 9, "final", state(9))], done_runs=["r"])
    assert z.run("r").status == "done" and len(z.checkpoints()) == 3
    with pytest.raises(ModelError, match="not registered"):
        z.commit([PendingCheckpoint("nope", 0, "init", state(0))])


def test_verify_finds_a_flipped_byte(tmp_path: Path) -> None:
    for shard in (True, False):
        z = make_zoo(tmp_path / f"zoo{shard}", shard=shard)
        assert z.verify().ok
        ck = z.checkpoint("r2-0000007")
        p = z.path / ck.file
        data = bytearray(p.read_bytes())
        data[ck.offset + ck.nbytes // 2] ^= 0x01  # one bit of one weight
        p.write_bytes(bytes(data))
        rep = z.verify()
        assert not rep.ok and any("r2-0000007 fails its sha256" in q for q in rep.problems)
        assert len(rep.problems) == 1  # only that checkpoint
        with pytest.raises(ModelError, match="corrupt"):
            z.load("r2-0000007")


def test_verify_finds_missing_truncated_and_orphan_files(tmp_path: Path) -> None:
    z = make_zoo(tmp_path / "zoo")
    files = sorted({c.file for c in z.checkpoints()})
    (z.path / files[0]).unlink()
    with open(z.path / files[1], "ab") as f:
        f.write(b"junk")
    (z.path / "data" / "r1" / "0000099.safetensors").write_bytes(b"stray")
    z.close()
    rep = Zoo(tmp_path / "zoo").verify()
    text = "\n".join(rep.problems)
    assert "missing" in text and "trailing bytes" in text and "orphan file" in text
    assert len(rep.problems) == 3


def test_crash_between_file_and_manifest_leaves_only_orphans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill windows of the protocol, made deterministic: during the temp write, and after the rename
    but before the transaction. Either way the manifest is unchanged, verify reports the debris, and
    the next writer deletes it."""
    z = Zoo(tmp_path / "zoo", create=True, writable=True)
    z.add_run("r", SPEC1, ["cord"], ["A"], "train", 2, {}, seed=0)
    z.commit([PendingCheckpoint("r", 0, "init", state(0))])

    class Killed(Exception):
        pass

    def die(*a: object, **k: object) -> None:
        raise Killed

    monkeypatch.setattr(z, "_add_sums", die)  # inside the transaction: rolled back
    with pytest.raises(Killed):
        z.commit([PendingCheckpoint("r", 9, "final", state(9))], done_runs=["r"])
    monkeypatch.undo()
    # a temp file as a kill during the write leaves it
    (z.path / "data" / "r" / ".0000009.safetensors.abc.tmp").write_bytes(b"half a file")
    assert len(z.checkpoints()) == 1 and z.run("r").status == "planned"
    z.close()
    rep = Zoo(tmp_path / "zoo").verify()
    assert not rep.ok and len(rep.problems) == 2  # the orphan shard and the temp file
    z = Zoo(tmp_path / "zoo", writable=True)  # the next writer cleans up
    assert z.verify().ok
    z.commit([PendingCheckpoint("r", 9, "final", state(9))], done_runs=["r"])
    assert z.verify().ok and z.run("r").status == "done"


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    z = make_zoo(tmp_path / "zoo")
    with pytest.raises(InputError, match="another process is writing"):
        Zoo(tmp_path / "zoo", writable=True)
    reader = Zoo(tmp_path / "zoo")
    assert len(reader.checkpoints()) == 9 and reader.writer_active()
    with pytest.raises(InputError, match="read-only"):
        reader.commit([])
    z.close()
    assert not reader.writer_active()
    Zoo(tmp_path / "zoo", writable=True).close()


def test_norm_stats_match_the_checkpoints(tmp_path: Path) -> None:
    z = make_zoo(tmp_path / "zoo")
    stats = z.norm_stats(SPEC1.hash(), split="train")  # r1 only (r3 is a test run)
    layout = ParamLayout.for_spec(SPEC1)
    want = layout.tensor_stats(z.load_flat(z.checkpoints(split="train")))
    assert stats.names == want.names and stats.count == 3
    assert torch.allclose(stats.mean, want.mean, atol=1e-9) and torch.allclose(stats.std, want.std, atol=1e-6)
    with pytest.raises(InputError, match="2 architectures"):
        z.norm_stats()


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a weightzoo zoo"):
        Zoo(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InputError, match="cannot be read"):
        Zoo(tmp_path / "bad")
    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / "manifest.sqlite").execute(
        "CREATE TABLE meta(key TEXT, value TEXT)"
    ).connection.commit()
    with pytest.raises(InputError, match="not a weightzoo zoo manifest"):
        Zoo(other)
    z = make_zoo(tmp_path / "zoo")
    with pytest.raises(InputError, match="no checkpoint 'nope'"):
        z.load("nope")
    with pytest.raises(UnknownNameError, match="split"):
        z.checkpoints(split="training")
    with pytest.raises(UnknownNameError, match="zoo dtype"):
        Zoo(tmp_path / "z2", create=True, dtype="bfloat16")
    z.close()
    with pytest.raises(InputError, match="exists with dtype float32"):
        Zoo(tmp_path / "zoo", create=True, dtype="float16")


# ---- grid -------------------------------------------------------------------------------------------
def test_grid_expands_deterministically(tiny_phantom_dataset) -> None:
    ds = tiny_phantom_dataset
    d = {
        "tasks": ["cord", "cord+gm", ["gm", "canal"]],
        "sites": ["A", "each"][1],
        "seeds": 2,
        "preset": "tiny",
        "optimizer": ["sgd", "adam"],
        "steps": 30,
        "checkpoints": 5,
    }
    plans = Grid(d).expand(ds)
    assert len(plans) == 3 * 2 * 2 * 2  # tasks x sites x optimizers x seeds
    again = Grid(dict(d)).expand(ds)
    assert [p.run_id for p in plans] == [p.run_id for p in again] and len({p.run_id for p in plans}) == 24
    p = plans[2]  # tasks cord, site A, adam, seed 0 (seeds innermost)
    assert (p.tasks, p.sites, p.config.optimizer, p.seed) == (("cord",), ("A",), "adam", 0)
    multi = [q for q in plans if q.tasks == ("cord", "gm")]
    assert multi and all(q.spec(1).num_classes == 2 for q in multi)
    assert all(len(q.steps) == 7 and q.steps[0] == 0 and q.steps[-1] == 30 for q in plans)
    assert all(0 < s < 30 for q in plans for s in q.checkpoint_steps)
    assert plans[0].checkpoint_steps == checkpoint_steps(0, 30, 5) != checkpoint_steps(1, 30, 5)
    splits = [q.split for q in plans]
    assert (splits.count("test"), splits.count("val"), splits.count("train")) == (2, 2, 20)  # exact, by run
    assert len(Grid({**d, "sites": "all"}).expand(ds)[0].sites) == 2
    ep = Grid({"tasks": "cord", "sites": "A", "epochs": 2, "batch_size": 8, "preset": "tiny"}).expand(ds)[0]
    assert ep.config.steps == 4  # 16 training slices of site A x 2 epochs / 8 per batch


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ({"tasks": ["cord"], "learning_rate": 0.1}, "unknown grid key"),
        ({"sites": "A"}, "no 'tasks'"),
        ({"tasks": ["cord"], "steps": 10, "epochs": 1}, "both 'steps' and 'epochs'"),
        ({"tasks": ["cord"], "seeds": [1, 1]}, "distinct"),
        ({"tasks": ["cord"], "run_split": {"train": 0.5}}, "sum to 1"),
        ({"tasks": ["cord"], "normalization": ["zscore", "rgb"]}, "one value"),
        ({"tasks": ["cord+cord"]}, "repeats a name"),
        ({"tasks": ["cord"], "lr": [0.1, 0.1]}, "same run twice"),
        ({"tasks": ["cord"], "optimizer": "lion"}, "unknown optimizer"),
        ({"tasks": ["spleen"]}, "task 'spleen' is not a task of dataset"),
        ({"tasks": [None]}, "tasks\\[0\\]: None is not allowed"),
        ({"tasks": ["cord"], "sites": ["Z"]}, "site 'Z' is not a site of dataset"),
    ],
)
def test_bad_grids_are_rejected(tiny_phantom_dataset, grid: dict, match: str) -> None:
    with pytest.raises((InputError, UnknownNameError), match=match):
        Grid(grid).expand(tiny_phantom_dataset)


def test_a_creation_killed_before_its_transaction_is_redone(tmp_path: Path) -> None:
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "manifest.sqlite").write_bytes(
        b""
    )  # the file exists, the transaction never committed
    with pytest.raises(InputError, match="cannot be read"):
        Zoo(tmp_path / "zoo")
    z = Zoo(tmp_path / "zoo", create=True, writable=True, dtype="float16")
    assert z.dtype == "float16" and z.runs() == [] and z.verify().ok
