"""Building zoos: the planned runs and checkpoints, a real SIGKILL mid-build then a restart, batched
training equal to training alone, metrics keyed by task, the CLI, nnU-Net export -> ingest, Ray, demo.

All on the tiny preset and the 64 px phantom fixture, one torch thread (the tests' machine is shared).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from weightzoo.cli import main
from weightzoo.data.slices import Preprocessing
from weightzoo.nets.unet import build_network, load_real_state_dict
from weightzoo.segmenter import load_model
from weightzoo.train.loop import train_on_slices
from weightzoo.train.losses import dice_counts, dice_from_counts
from weightzoo.zoo import Zoo
from weightzoo.zoo.batched import choose_mode
from weightzoo.zoo.build import build_zoo
from weightzoo.zoo.grid import Grid
from weightzoo.zoo.runs import RunData, load_zoo_data, train_sequential

# the "done when" grid: 2 tasks x 2 sites x 2 seeds, tiny preset
GRID = {
    "tasks": ["cord", "gm"],
    "sites": "each",
    "seeds": 2,
    "preset": "tiny",
    "steps": 8,
    "batch_size": 4,
    "checkpoints": 3,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tiny_phantom_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The done-when zoo, built through the CLI (mode auto: calibrated on this CPU)."""
    root = tmp_path_factory.mktemp("zoo")
    (root / "grid.yaml").write_text(yaml.safe_dump(GRID))
    args = ["zoo", "build", "--dataset", str(tiny_phantom_dataset.root), "--grid", str(root / "grid.yaml")]
    assert main([*args, "--zoo", str(root / "zoo"), "--no-progress"]) == 0
    return root / "zoo"


def _sha(zoo: Path) -> dict[str, str]:
    with Zoo(zoo) as z:
        return {c.ckpt_id: c.sha256 for c in z.checkpoints()}


def test_build_gives_the_planned_zoo(built: Path, tiny_phantom_dataset, capsys, tmp_path: Path) -> None:
    plans = Grid(GRID).expand(tiny_phantom_dataset)
    with Zoo(built) as z:
        runs, cks = z.runs(), z.checkpoints()
        assert len(runs) == 8 and all(r.status == "done" for r in runs)
        assert len(cks) == 8 * 5 == sum(p.n_planned for p in plans)
        for p in plans:
            got = z.checkpoints(run_id=p.run_id)
            assert [c.step for c in got] == list(p.steps)
            assert [c.kind for c in got] == ["init", "random", "random", "random", "final"]
            assert z.run(p.run_id).sites == list(p.sites) and z.run(p.run_id).split == p.split
        # metrics at every checkpoint, validation split only (site A's val subject for site-A runs)
        assert all(c.train_loss is not None and c.val_loss is not None for c in cks)
        assert all(set(c.metrics) == set(c.tasks) and "val_dice" in c.metrics[c.tasks[0]] for c in cks)
        assert {r.split for r in runs} <= {"train", "val", "test"}
        stats = z.norm_stats()
        assert stats.count == sum(r.n_checkpoints for r in runs if r.split == "train")
    capsys.readouterr()
    assert main(["zoo", "ls", str(built), "--runs"]) == 0
    out = capsys.readouterr().out
    assert "8 runs (8 done" in out and "40 of 40 checkpoints" in out and "cord" in out and "gm" in out
    assert main(["zoo", "ls", str(built), "--task", "cord", "--site", "A"]) == 0
    assert "2 runs (2 done" in capsys.readouterr().out
    assert main(["zoo", "ls", str(built), "--task", "bogus"]) == 2  # not "0 runs"
    assert "unknown task 'bogus'" in capsys.readouterr().err
    # verify passes, then fails after one byte of one file changes
    copy = tmp_path / "zoo"
    shutil.copytree(built, copy)
    assert main(["zoo", "verify", str(copy)]) == 0
    victim = sorted((copy / "data").rglob("*.wzshard"))[3]
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["zoo", "verify", str(copy)]) == 1
    assert "fails its sha256 check" in capsys.readouterr().out
    # building again changes nothing
    res = build_zoo(tiny_phantom_dataset, GRID, built, progress=False, log=lambda s: None)
    assert (res.runs_skipped, res.runs_trained, res.checkpoints_committed) == (8, 0, 0)


def test_kill_9_mid_build_then_restart(
    built: Path, tiny_phantom_dataset, tmp_path: Path, kill_build_after
) -> None:
    """A real build process is SIGKILLed after some checkpoints are committed (one file each, so
    runs are left half-committed), then restarted: exactly the planned runs and checkpoints, no
    duplicates or orphans, verify passes, and every checkpoint is bit-identical to an uninterrupted
    build (`built`, same grid, sharded: the checksums cover the checkpoint bytes, not the layout)."""
    grid = GRID
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    zoo = tmp_path / "zoo"
    kill_build_after(tiny_phantom_dataset.root, tmp_path / "grid.yaml", zoo, 8, "--mode", "sequential")
    with Zoo(zoo) as z:
        n_before = len(z.checkpoints())
        assert 8 <= n_before < 40
        assert any(0 < r.n_checkpoints < r.n_planned for r in z.runs()) or n_before % 5 == 0

    res = build_zoo(tiny_phantom_dataset, grid, zoo, mode="sequential", progress=False, log=lambda s: None)
    assert res.checkpoints_committed == 40 - n_before
    plans = Grid(grid).expand(tiny_phantom_dataset)
    with Zoo(zoo) as z:
        assert sorted(r.run_id for r in z.runs()) == sorted(p.run_id for p in plans)
        assert all(r.status == "done" and r.n_checkpoints == r.n_planned for r in z.runs())
        rows = z.db.execute("SELECT run_id, step FROM checkpoints").fetchall()
        assert len(rows) == len(set(rows)) == 40
        for p in plans:
            assert [c.step for c in z.checkpoints(run_id=p.run_id)] == list(p.steps)
        rep = z.verify()
        assert rep.ok, rep.problems
        assert rep.n_files == 40 and len(list((zoo / "data").rglob("*"))) == 40 + 8  # files + run folders
    assert _sha(zoo) == _sha(built)


def test_kill_9_mid_batched_build_then_restart(
    tiny_phantom_dataset, tmp_path: Path, kill_build_after
) -> None:
    """The same on the batched path (micro preset, 32 px, 8 runs in one grouped batch): killed after
    its first checkpoints and restarted (the batch trains again, committed checkpoints are skipped),
    it ends with every checkpoint bit-identical to an uninterrupted batched build."""
    grid = {**GRID, "preset": "micro", "size": [32, 32], "steps": 40}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    ref = build_zoo(
        tiny_phantom_dataset, grid, tmp_path / "ref", mode="batched", progress=False, log=lambda s: None
    )
    assert ref.modes == {"batched": 8}
    zoo = tmp_path / "zoo"
    kill_build_after(tiny_phantom_dataset.root, tmp_path / "grid.yaml", zoo, 10, "--mode", "batched")
    with Zoo(zoo) as z:
        n_before = len(z.checkpoints())
        assert 10 <= n_before < 40
    res = build_zoo(tiny_phantom_dataset, grid, zoo, mode="batched", progress=False, log=lambda s: None)
    assert res.checkpoints_committed == 40 - n_before
    with Zoo(zoo) as z:
        assert z.verify().ok
    assert _sha(zoo) == _sha(tmp_path / "ref")


def _plans_and_data(ds, grid: dict) -> tuple[list, list]:
    plans = Grid(grid).expand(ds)
    data = load_zoo_data(ds, plans, Preprocessing("zscore", (64, 64), 2, ds.n_channels))
    return plans, [RunData.make(p, *data.for_run(p), torch.device("cpu")) for p in plans]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batched_equals_sequential(tiny_phantom_dataset, optimizer: str, alone_and_together) -> None:
    """4 runs with their own seeds, sites, lr and augmentation, trained in one batch vs each alone.

    Stated tolerance after 10 steps: network outputs on the validation slices within 1e-3 (max abs
    logit), validation losses within 1e-4, every checkpoint's weights within 1e-4 for SGD. (Adam
    divides by the gradient's running RMS: for conv biases before an InstanceNorm, whose true gradient
    is 0, rounding noise of either path becomes steps of ±lr, so Adam's weights are compared through
    the outputs, which those biases do not affect.)"""
    grid = {
        "tasks": ["cord"],
        "sites": "each",
        "seeds": [3],
        "preset": "tiny",
        "steps": 10,
        "batch_size": 4,
        "checkpoints": 2,
        "optimizer": optimizer,
        "lr": [0.01, 0.003] if optimizer == "sgd" else [0.001, 0.003],
        "augment": 1.0,
    }
    plans, datas = _plans_and_data(tiny_phantom_dataset, {**grid, "lr": grid["lr"][0]})
    plans2, datas2 = _plans_and_data(
        tiny_phantom_dataset, {**grid, "lr": grid["lr"][1], "seeds": [4, 5], "augment": 0.5}
    )
    plans, datas = plans + plans2[:2], datas + datas2[:2]  # 2 runs on A and B, then 2 seeds on A
    assert len({(p.config.learning_rate, p.config.augment, p.seed, p.sites) for p in plans}) == 4
    alone, together = alone_and_together(plans, datas)
    assert alone.keys() == together.keys() and len(alone) == 4 * 4
    for (rid, step), a in alone.items():
        b = together[(rid, step)]
        assert a.info["mode"] == "sequential" and b.info["mode"] == "batched"
        assert abs(a.val_loss - b.val_loss) < 1e-4 and abs(a.train_loss - b.train_loss) < 1e-4
        if optimizer == "sgd":
            assert max((a.state[k] - b.state[k]).abs().max().item() for k in a.state) < 1e-4
        p, d = next((p, d) for p, d in zip(plans, datas, strict=True) if p.run_id == rid)
        x = torch.from_numpy(d.val.images)
        outs = []
        for st in (a.state, b.state):
            net = load_real_state_dict(build_network(p.spec(1)), st).eval()
            with torch.no_grad():
                outs.append(net(x))
        assert (outs[0] - outs[1]).abs().max().item() < 1e-3
    # training really happened: the final weights moved away from the initialisation
    rid = plans[0].run_id
    assert (
        max((alone[(rid, 10)].state[k] - alone[(rid, 0)].state[k]).abs().max() for k in alone[(rid, 0)].state)
        > 1e-3
    )


def test_a_zoo_run_is_weightzoo_train(tiny_phantom_dataset, tmp_path: Path) -> None:
    """One recipe: a zoo run trained alone ends with exactly the weights of `train_on_slices`."""
    plans, datas = _plans_and_data(
        tiny_phantom_dataset,
        {"tasks": ["cord+gm"], "sites": "A", "preset": "tiny", "steps": 6, "batch_size": 4, "checkpoints": 1},
    )
    got: dict = {}
    train_sequential(plans[0], datas[0], torch.device("cpu"), lambda c: got.__setitem__(c.step, c))
    res = train_on_slices(datas[0].train, datas[0].val, plans[0].config, tmp_path / "m", progress=False)
    ref = {k: v for k, v in res.segmenter.net.state_dict().items()}
    final = got[6].state
    assert all(torch.equal(final[k], ref[k]) for k in final)
    assert res.history[-1]["val_loss"] == pytest.approx(got[6].val_loss, abs=1e-6)
    assert load_model(tmp_path / "m").tasks == ["cord", "gm"]


def test_multi_task_metrics_are_keyed_by_task(tiny_phantom_dataset, tmp_path: Path) -> None:
    """A [gm, cord] run: channel 0's Dice is recorded as gm's, channel 1's as cord's (recomputed here)."""
    grid = {
        "tasks": [["gm", "cord"]],
        "sites": "all",
        "preset": "tiny",
        "steps": 6,
        "batch_size": 4,
        "checkpoints": 1,
    }
    build_zoo(tiny_phantom_dataset, grid, tmp_path / "zoo", progress=False, log=lambda s: None)
    plans, datas = _plans_and_data(tiny_phantom_dataset, grid)
    with Zoo(tmp_path / "zoo") as z:
        ck = z.checkpoints(kind="final")[0]
        assert ck.tasks == ["gm", "cord"] and z.run(ck.run_id).tasks == ["gm", "cord"]
        net = load_real_state_dict(build_network(plans[0].spec(1)), z.load(ck)).eval()
    val = datas[0].val
    with torch.no_grad():
        logits = net(torch.from_numpy(val.images))
    for k, task in enumerate(["gm", "cord"]):
        labels = torch.from_numpy(val.labels[:, k : k + 1])
        dice = dice_from_counts(dice_counts(logits[:, k : k + 1], labels))[0]
        assert ck.metrics[task]["val_dice"] == pytest.approx(dice, abs=1e-6)
    assert not np.isclose(ck.metrics["gm"]["val_dice"], ck.metrics["cord"]["val_dice"])


def test_export_then_ingest_is_bit_exact(built: Path, tmp_path: Path, capsys) -> None:
    with Zoo(built) as z:
        ck = z.checkpoints(kind="final")[0]
        want = z.load(ck)
    assert main(["zoo", "export", str(built), ck.ckpt_id, str(tmp_path / "results")]) == 0
    pth = sorted((tmp_path / "results").rglob("checkpoint_final.pth"))
    assert len(pth) == 1 and (pth[0].parent.parent / "plans.json").is_file()
    assert main(["zoo", "ingest", str(pth[0].parent.parent), "--zoo", str(tmp_path / "z2")]) == 0
    assert (
        main(["zoo", "ingest", str(pth[0].parent.parent), "--zoo", str(tmp_path / "z2")]) == 0
    )  # idempotent
    with Zoo(tmp_path / "z2") as z2:
        (back,) = z2.checkpoints()
        got = z2.load(back)
        assert back.tasks == ck.tasks and z2.run(back.run_id).source == "nnunet"
        assert back.metrics == ck.metrics and back.val_loss == ck.val_loss  # our export carries them
        assert z2.spec(back.arch_hash).hash() == ck.arch_hash
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    capsys.readouterr()
    assert main(["zoo", "export", str(built), "nope", str(tmp_path / "r2")]) == 2
    assert "no checkpoint 'nope'" in capsys.readouterr().err


def test_choose_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from weightzoo.nets.unet import ArchSpec
    from weightzoo.zoo import batched

    spec, cpu = ArchSpec.preset("tiny"), torch.device("cpu")
    assert choose_mode(spec, 4, (64, 64), 1, cpu) == "sequential"
    assert choose_mode(spec, 4, (64, 64), 5, cpu, "batched") == "batched"
    assert choose_mode(spec, 4, (64, 64), 5, cpu, "sequential") == "sequential"
    assert choose_mode(spec, 4, (64, 64), 5, torch.device("cuda"), "auto") == "batched"
    monkeypatch.setattr(batched, "measure_modes", lambda *a, **k: (1.0, 0.1))
    assert choose_mode(spec, 4, (64, 64), 5, cpu, steps=10) == "sequential"  # too short to time
    for t_seq, t_bat, want in ((1.0, 0.5, "batched"), (1.0, 0.9, "sequential"), (1.0, 2.0, "sequential")):
        monkeypatch.setattr(batched, "_choices", {})
        monkeypatch.setattr(batched, "measure_modes", lambda *a, t=(t_seq, t_bat), **k: t)
        assert choose_mode(spec, 4, (64, 64), 5, cpu) == want  # batched only when clearly faster
    with pytest.raises(Exception, match="unknown training mode"):
        choose_mode(spec, 4, (64, 64), 5, cpu, "fast")


def test_ray_executor_survives_a_lost_worker(tiny_phantom_dataset, tmp_path: Path, monkeypatch) -> None:
    """Local Ray instance; the first task's worker dies (os._exit) and is retried; one writer commits.
    The zoo equals a local build bit for bit."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'weightzoo[ray]')")
    from weightzoo.zoo import executors

    grid = {
        "tasks": ["cord"],
        "sites": "A",
        "preset": "tiny",
        "steps": 5,
        "batch_size": 4,
        "checkpoints": 1,
    }
    orig = executors.run_ray
    marker = tmp_path / "crashed"
    monkeypatch.setattr(executors, "run_ray", lambda *a, **k: orig(*a, **k, crash_once=str(marker)))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    res = build_zoo(
        tiny_phantom_dataset,
        grid,
        tmp_path / "ray",
        executor="ray",
        mode="sequential",
        progress=False,
        log=lambda s: None,
    )
    assert marker.exists() and res.checkpoints_committed == 3
    build_zoo(
        tiny_phantom_dataset, grid, tmp_path / "local", mode="sequential", progress=False, log=lambda s: None
    )
    assert _sha(tmp_path / "ray") == _sha(tmp_path / "local")
    with Zoo(tmp_path / "ray") as z:
        assert z.verify().ok


def test_bad_build_inputs(tiny_phantom_dataset, tmp_path: Path, capsys) -> None:
    (tmp_path / "g.yaml").write_text("tasks: [cord]\nlearnrate: 0.1\n")
    args = ["zoo", "build", "--dataset", str(tiny_phantom_dataset.root), "--zoo", str(tmp_path / "z")]
    assert main([*args, "--grid", str(tmp_path / "g.yaml")]) == 2
    assert "unknown grid key(s) ['learnrate']" in capsys.readouterr().err
    (tmp_path / "g.yaml").write_text("tasks: [cord]\n")
    assert main([*args, "--grid", str(tmp_path / "g.yaml"), "--executor", "slurm"]) == 2
    assert "unknown executor 'slurm'" in capsys.readouterr().err
    assert main(["zoo", "ls", str(tmp_path / "nothing")]) == 2
    assert "not a weightzoo zoo" in capsys.readouterr().err


def test_demo_zoo_adds_best_checkpoints_and_curves(tiny_phantom_dataset, tmp_path: Path) -> None:
    from weightzoo.evaluate.report import Report
    from weightzoo.zoo.demo import demo_zoo

    rep = Report(tmp_path, "demo")
    res = demo_zoo(
        tmp_path,
        tiny_phantom_dataset,
        rep,
        log=lambda s: None,
        seconds_budget=0,  # the minimum steps on any machine, however fast
        seeds=1,
        checkpoints=2,
        min_steps=6,
    )
    assert (res["runs"], res["checkpoints"], res["steps"]) == (3 * 2, 3 * 2 * 4, 6) and res["verify_ok"]
    assert set(res["best"]) <= {"cord", "gm", "canal"} and "cord" in res["best"]
    html = rep.write().read_text()
    assert "Best checkpoint per task" in html and res["best"]["cord"]["ckpt_id"] in html
    assert (tmp_path / "figures" / "zoo_val_dice.png").is_file()


def test_a_diverging_zoo_run_stops_the_build_with_one_line(
    tiny_phantom_dataset, tmp_path: Path, capsys
) -> None:
    """lr 1e30 makes the weights non-finite: exit 2 naming the run and the fix; no NaN is stored."""
    grid = {**GRID, "tasks": ["cord"], "sites": ["A"], "seeds": 1, "lr": 1e30}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    argv = [
        "zoo",
        "build",
        "--dataset",
        str(tiny_phantom_dataset.root),
        "--grid",
        str(tmp_path / "grid.yaml"),
    ]
    rc = main([*argv, "--zoo", str(tmp_path / "zoo"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "diverged at step" in err and "lr" in err, err
    zoo = Zoo(tmp_path / "zoo")
    for ck in zoo.checkpoints():
        assert all(torch.isfinite(v).all() for v in zoo.load(ck).values())
    assert zoo.runs(status="done") == []
