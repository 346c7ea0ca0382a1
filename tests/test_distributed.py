"""Training under torchrun (weightzoo.train.distributed), with real gloo processes on the CPU.

Launches are `python -m torch.distributed.run --standalone`, exactly what a user types as torchrun.
Every test uses the tiny preset at 32 px and one thread per rank, so a launch takes a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightzoo.cli import main
from weightzoo.errors import InputError
from weightzoo.train.distributed import CommCounter, DataParallel, DistContext, DistOptions, shard_cases

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="this torch build has no gloo backend",
    ),
]

COMMON = ["--preset", "tiny", "--size", "32", "--device", "cpu", "--no-progress", "--batch-size", "4"]


def torchrun(n: int, args: list[str], wait: bool = True, cwd: Path | None = None) -> subprocess.Popen | int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    cmd += ["-m", "weightzoo", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    if proc.returncode:
        print(out[-4000:])
    return proc.returncode


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def train_args(ds: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "-d", str(ds), "-t", "cord", "--steps", str(steps), *COMMON, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def plain_run(tiny_phantom_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "m"
    assert main(train_args(tiny_phantom_dataset.root, out, 8)) == 0
    return out


# ---- synchronous DDP = one process on the global batch ----------------------------------------------
def test_two_ranks_match_one_process_on_the_global_batch(tiny_phantom_dataset, plain_run, tmp_path) -> None:
    out = tmp_path / "ddp2"
    assert torchrun(2, train_args(tiny_phantom_dataset.root, out, 8, "--ddp")) == 0
    assert max_diff(weights(plain_run), weights(out)) < 1e-5  # float tolerance: sums in another order
    info = json.loads((out / "model.json").read_text())["info"]["distributed"]
    n_bytes = sum(v.numel() * 4 for v in weights(out).values())
    comm = info["communication"]
    assert info["world_size"] == 2 and info["ddp"]
    assert comm["calls"]["loss"] == 8  # one all-reduce of the batch-Dice sums per step
    assert comm["bytes"]["gradients"] == 8 * n_bytes  # every step all-reduces every gradient once
    assert comm["modelled_seconds_1gbit"] > comm["modelled_seconds_10gbit"] > 0
    assert not (out / "checkpoint_latest.safetensors").exists()


def test_one_rank_gives_exactly_the_plain_weights(tiny_phantom_dataset, plain_run, tmp_path) -> None:
    out = tmp_path / "ddp1"
    assert torchrun(1, train_args(tiny_phantom_dataset.root, out, 8, "--ddp")) == 0
    a, b = weights(plain_run), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- post-local SGD + SlowMo: kill -9 one rank, restart, same weights --------------------------------
def _rank_pids(parent: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (children of the launcher)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(
                kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode().split("\0") if "=" in kv
            )
            if "RANK" in env:
                found[int(env["RANK"])] = int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_killing_one_rank_and_restarting_ends_at_the_uninterrupted_weights(
    tiny_phantom_dataset, tmp_path
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("checkpoint_every: 5\nval_every: 40\n")
    flags = [
        "--local-sgd",
        "4",
        "--warmup-sync",
        "2",
        "--slowmo",
        "0.5",
        "--average-optimizer",
        "-c",
        str(cfg),
    ]
    ds = tiny_phantom_dataset.root
    assert torchrun(2, train_args(ds, tmp_path / "whole", 80, *flags)) == 0

    out = tmp_path / "killed"
    proc = torchrun(2, train_args(ds, out, 80, *flags), wait=False)
    assert isinstance(proc, subprocess.Popen)
    deadline, killed_at = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        ck = out / "checkpoint_latest.json"
        try:
            step = json.loads(ck.read_text())["step"] if ck.exists() else 0
        except (OSError, ValueError):
            step = 0
        if step >= 15:  # a checkpoint taken between averages (15 = 2 + 4·3 + 1): ranks differ there
            pids = _rank_pids(proc.pid)
            if 1 in pids:
                os.kill(pids[1], signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.005)
    proc.communicate(timeout=120)
    assert killed_at is not None, "the run ended before a rank could be killed"
    assert proc.returncode != 0 and not (out / "model.json").exists()
    ck = json.loads((out / "checkpoint_latest.json").read_text())
    assert ck["step"] < 80

    assert torchrun(2, train_args(ds, out, 80, *flags)) == 0
    a, b = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((out / "model.json").read_text())["info"]
    assert info["resumed_from"] == ck["step"]
    comm = info["distributed"]["communication"]
    n_bytes = sum(v.numel() * 4 for v in a.values())
    # resumed call: averages after steps 22, 26, ..., 78 and the last one (80)
    averages = sum(1 for d in range(ck["step"] + 1, 81) if d > 2 and ((d - 2) % 4 == 0 or d == 80))
    assert comm["bytes"]["parameters"] == averages * n_bytes
    assert comm["calls"]["optimizer"] == averages


SLOWMO_SCRIPT = r"""
import json, sys, torch
import torch.distributed as dist
from weightzoo.train.distributed import DataParallel, DistContext, DistOptions
dist.init_process_group("gloo")
r = dist.get_rank()
dp = DataParallel(DistOptions(local_sgd=2, slowmo=0.5, slowmo_lr=0.8, average_optimizer=True), DistContext(r, 2, r))
net = torch.nn.Linear(3, 1, bias=False)
w0, d1, d2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.1, -0.2, 0.3]]), torch.tensor([[-0.4, 0.5, 0.6]])
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
with torch.no_grad():
    net.weight.copy_(w0)
dp.ready(net, 0)
net.weight.grad = torch.full_like(w0, float(r + 1))
opt.step()  # momentum buffer: 1 on rank 0, 2 on rank 1
with torch.no_grad():
    net.weight.copy_(w0 + (r + 1) * d1)  # as if two local steps had moved the ranks apart
assert not dp.after_step(1, 10, 0.1, net, opt)
assert dp.after_step(2, 10, 0.1, net, opt)
x1 = net.weight.detach().clone()
buf = opt.state[net.weight]["momentum_buffer"].clone()
with torch.no_grad():
    net.weight.copy_(x1 + (r + 1) * d2)
assert dp.after_step(4, 10, 0.05, net, opt)
json.dump({"x1": x1.tolist(), "x2": net.weight.tolist(), "buf": buf.tolist(),
           "comm": dp.comm.summary(2)}, open(sys.argv[1] + f"/rank{r}.json", "w"))
dist.destroy_process_group()
"""


def test_slowmo_matches_the_hand_computed_update_on_two_ranks(tmp_path) -> None:
    script = tmp_path / "slowmo.py"
    script.write_text(SLOWMO_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    res = subprocess.run(
        [*cmd, str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True
    )
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    w0, d1, d2 = (
        torch.tensor([[1.0, 2.0, 3.0]]),
        torch.tensor([[0.1, -0.2, 0.3]]),
        torch.tensor([[-0.4, 0.5, 0.6]]),
    )
    # u ← β·u + (x₀ − mean x)/γ ; x ← x₀ − α·γ·u, with β = 0.5, α = 0.8
    u1 = (w0 - (w0 + 1.5 * d1)) / 0.1
    x1 = w0 - 0.8 * 0.1 * u1  # = w0 + 1.2·d1
    u2 = 0.5 * u1 + (x1 - (x1 + 1.5 * d2)) / 0.05
    x2 = x1 - 0.8 * 0.05 * u2  # = x1 + 0.3·d1 + 1.2·d2
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert torch.allclose(torch.tensor(got["x1"]), x1, atol=1e-6)
        assert torch.allclose(torch.tensor(got["x2"]), x2, atol=1e-6)
        assert torch.allclose(torch.tensor(got["buf"]), torch.full((1, 3), 1.5))  # momentum averaged too
        assert got["comm"]["calls"] == {"parameters": 2, "optimizer": 2}
        assert got["comm"]["bytes"]["parameters"] == 2 * 3 * 4


# ---- the consortium case: each rank trains on its own site ---------------------------------------
def test_split_by_site_gives_each_rank_its_own_sites_data(tiny_phantom_dataset, tmp_path) -> None:
    out = tmp_path / "sites"
    flags = ["--local-sgd", "2", "--split", "site"]
    assert torchrun(2, train_args(tiny_phantom_dataset.root, out, 6, *flags)) == 0
    info = json.loads((out / "model.json").read_text())["info"]
    rank0_cases = info["cases"]["train"]
    assert rank0_cases and {tiny_phantom_dataset.site(c) for c in rank0_cases} == {"A"}
    assert info["distributed"]["split"] == "site"


def test_shard_cases_round_robins_groups_and_refuses_too_few(monkeypatch) -> None:
    cases = ["a1", "a2", "b1", "c1", "c2"]
    opts = DistOptions(local_sgd=4, split="site")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert shard_cases(cases, lambda c: c[0], opts) == ["b1"]
    monkeypatch.setenv("RANK", "0")
    assert shard_cases(cases, lambda c: c[0], opts) == ["a1", "a2", "c1", "c2"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(InputError, match="3 sites for 4 processes"):
        shard_cases(cases, lambda c: c[0], opts)


# ---- the other routes under torchrun --------------------------------------------------------------
def test_heads_backbone_two_ranks_match_one_process(tiny_phantom_dataset, tmp_path) -> None:
    args = ["heads", "train", "-d", str(tiny_phantom_dataset.root), "-t", "cord", "--steps", "6"]
    args += ["--head-steps", "2", "--preset", "tiny", "--size", "32", "--device", "cpu", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert torchrun(2, [*args, "--out", str(tmp_path / "two"), "--ddp"]) == 0
    for name in ("backbone.safetensors", "heads/A.safetensors"):
        assert max_diff(weights(tmp_path / "one", name), weights(tmp_path / "two", name)) < 1e-5
    assert json.loads((tmp_path / "two" / "heads.json").read_text())["info"]["distributed"]["world_size"] == 2


def test_delta_generator_trains_with_ddp(finetune_zoo, tmp_path) -> None:
    args = [
        "generate",
        "train",
        "--kind",
        "delta",
        "--zoo",
        str(finetune_zoo),
        "--steps",
        "20",
        "--batch-size",
        "8",
    ]
    assert torchrun(2, [*args, "--out", str(tmp_path / "g"), "--device", "cpu", "--ddp"]) == 0
    meta = json.loads((tmp_path / "g" / "generator.json").read_text())
    assert (
        meta["distributed"]["world_size"] == 2
        and meta["distributed"]["communication"]["calls"]["gradients"] >= 20
    )


# ---- errors: one line, exit 2 ---------------------------------------------------------------------
def test_torchrun_without_ddp_is_refused(tiny_phantom_dataset, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(train_args(tiny_phantom_dataset.root, tmp_path / "m", 2)) == 2
    assert "add --ddp" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--slowmo", "0.5"], "add --local-sgd"),
        (["--local-sgd", "-1"], "must be ≥ 0"),
        (["--local-sgd", "4", "--split", "hospital"], "unknown --split"),
        (["--local-sgd", "4", "--slowmo", "1.5"], "--slowmo must be in"),
    ],
)
def test_bad_options_get_one_line(tiny_phantom_dataset, tmp_path, capsys, flags, message) -> None:
    assert main(train_args(tiny_phantom_dataset.root, tmp_path / "m", 2, *flags)) == 2
    assert message in capsys.readouterr().err


def test_route_limits_and_batch_divisibility() -> None:
    with pytest.raises(InputError, match="synchronous DDP only"):
        DataParallel.start(DistOptions(local_sgd=4), torch.device("cpu"), "generator", local_sgd=False)
    dp = DataParallel(DistOptions(ddp=True), DistContext(1, 2, 1))
    assert dp.rows(6).tolist() == [1, 3, 5]
    with pytest.raises(InputError, match="use --batch-size 4"):
        dp.rows(5)


def test_modelled_time_is_the_ring_all_reduce_formula() -> None:
    c = CommCounter()
    c.add_bytes("gradients", 10**9, calls=10)
    # 4 ranks: 2·3/4 of 1 GB at 10 Gbit/s = 1.2 s, plus 10 calls · 6 rounds · 50 µs
    assert c.modelled_seconds(4, 10.0) == pytest.approx(1.2 + 10 * 6 * 50e-6)
    assert c.modelled_seconds(1, 10.0) == 0.0


def test_hypernetwork_and_incontext_routes_train_with_ddp(tiny_phantom_dataset, tmp_path) -> None:
    hyper = ["hyper", "train", "-d", str(tiny_phantom_dataset.root), "-t", "cord", "--preset", "tiny"]
    hyper += ["--steps", "4", "--size", "32", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    assert torchrun(2, [*hyper, "--out", str(tmp_path / "h"), "--ddp"]) == 0
    meta = json.loads((tmp_path / "h" / "hyper.json").read_text())
    assert meta["info"]["distributed"]["communication"]["calls"]["gradients"] >= 4
    ic = ["incontext", "train", "--tasks", "synth", "--preset", "tiny", "--steps", "4", "--device", "cpu"]
    assert torchrun(2, [*ic, "--out", str(tmp_path / "ic"), "--ddp"]) == 0
    meta = json.loads((tmp_path / "ic" / "config.json").read_text())
    assert meta["distributed"]["world_size"] == 2 and meta["finished"]


def test_a_ddp_job_runs_on_ray_actors(tiny_phantom_dataset, plain_run, tmp_path) -> None:
    pytest.importorskip("ray", reason="ray is not installed (pip install 'weightzoo[ray]')")
    import ray

    from weightzoo.train.ray_launch import run_on_ray

    out = tmp_path / "ray2"
    try:
        codes = run_on_ray(train_args(tiny_phantom_dataset.root, out, 8, "--ddp"), workers=2)
    finally:
        ray.shutdown()
    assert codes == [0, 0]
    assert max_diff(weights(plain_run), weights(out)) < 1e-5  # the same job as under torchrun
