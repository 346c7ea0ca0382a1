"""Model soups and merges from a base: the soup is the exact mean of the selected fine-tunes, the
selection rule (never test runs, one task set, one site), greedy soups never lower the val score, soup
folders load and export, random-init zoos and test-split selection are refused, DARE. One thread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from weightzoo.cli import main
from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError
from weightzoo.generate.merge import body_mask, mean_score, merge_vectors, merge_zoo
from weightzoo.generate.vectors import TaskLayout
from weightzoo.nets.unet import ArchSpec, build_network, real_state_dict
from weightzoo.zoo import PendingCheckpoint, Zoo
from weightzoo.zoo.base import restrict_to_tasks
from weightzoo.zoo.soup import ValScorer, greedy_soup, make_soup, select_candidates, uniform_soup

TRIPLE = ["cord", "gm", "canal"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


# ---- selection and the uniform soup ---------------------------------------------------------------------
def test_selection_rule_never_takes_test_runs(finetune_zoo: Path) -> None:
    zoo = Zoo(finetune_zoo)
    skipped_test = 0
    for tasks in (["cord"], ["gm"], TRIPLE):
        for site in ("A", "B"):
            c = select_candidates(zoo, tasks, site)
            want = [r for r in zoo.runs() if sorted(r.tasks) == sorted(tasks) and site in r.sites]
            skipped_test += sum(r.split == "test" for r in want)
            assert set(c.runs) == {r.run_id for r in want if r.split != "test"}
            assert all(ck.kind == "final" and ck.split in ("train", "val") for ck in c.checkpoints)
            assert len(c.checkpoints) == len(c.runs) and c.base_id == zoo.base_ids()[0]
    assert skipped_test > 0, "the fixture's test runs must have been left out somewhere"
    ns = select_candidates(zoo, ["cord"], "A", trainable="norm_seg")
    assert ns.runs and all(r.config["trainable"] == "norm_seg" for r in ns.runs.values())
    with pytest.raises(InputError, match="trainable decoder"):
        select_candidates(zoo, ["cord"], "A", trainable="decoder")
    with pytest.raises(InputError, match="no finished train/val runs of exactly cord\\+canal"):
        select_candidates(zoo, ["cord", "canal"], "A")


def test_uniform_soup_is_the_elementwise_mean(finetune_zoo: Path) -> None:
    zoo = Zoo(finetune_zoo)
    cands = select_candidates(zoo, ["cord"], "A")
    states = [zoo.load(c) for c in cands.checkpoints]
    assert len(states) >= 3
    soup = make_soup(zoo, ["cord"], "A")  # uniform; reports val Dice from the zoo's dataset
    assert soup.chosen == [c.ckpt_id for c in cands.checkpoints] and soup.val_dice is not None
    for k, v in soup.state.items():
        by_hand = states[0][k].clone()
        for s in states[1:]:
            by_hand = by_hand + s[k]
        assert torch.equal(v, by_hand / len(states)), k
    # another task order: the same soup with its seg rows (one per task) reordered
    a = make_soup(zoo, TRIPLE, "B").state
    b = make_soup(zoo, ["canal", "cord", "gm"], "B").state
    assert all(torch.equal(b[k], v) for k, v in restrict_to_tasks(a, TRIPLE, ["canal", "cord", "gm"]).items())
    with pytest.raises(InputError, match="another architecture"):
        uniform_soup([states[0], {k: v[:1] for k, v in states[0].items()}])
    with pytest.raises(InputError, match="different outputs"):
        uniform_soup(states[:2], [["cord"], ["gm"]])


# ---- greedy -----------------------------------------------------------------------------------------------
def _dist_score(target: torch.Tensor):
    return lambda state: -float((state["w"] - target).norm())


def test_greedy_soup_keeps_the_best_and_never_lowers_the_score() -> None:
    cands = {
        "a": {"w": torch.tensor([1.0, 0.0])},
        "b": {"w": torch.tensor([-1.0, 0.2])},
        "c": {"w": torch.tensor([0.0, 5.0])},
        "d": {"w": torch.tensor([-0.9, -0.1])},
    }
    score = _dist_score(torch.zeros(2))
    soup, chosen, log = greedy_soup(cands, score)
    assert chosen == ["d", "a"]  # d is the best alone; a improves the soup; b and c would lower it
    assert torch.equal(soup["w"], (cands["d"]["w"] + cands["a"]["w"]) / 2)
    assert [e["ckpt_id"] for e in log] == ["d", "a", "b", "c"] and [e["kept"] for e in log] == [
        True,
        True,
        False,
        False,
    ]
    # random candidates: the first kept is the best alone, the soup's score never drops below it
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        target = torch.randn(3, generator=g)
        cands = {str(i): {"w": torch.randn(3, generator=g) * 2} for i in range(6)}
        score = _dist_score(target)
        soup, chosen, log = greedy_soup(cands, score)
        own = {k: score(v) for k, v in cands.items()}
        assert chosen[0] == max(own, key=own.get)
        kept = [e["soup_score"] for e in log if e["kept"]]
        assert kept == sorted(kept) and score(soup) == kept[-1] >= max(own.values())
    # "does not decrease": a candidate that leaves the score equal is kept
    same = {"x": {"w": torch.ones(2)}, "y": {"w": torch.ones(2)}}
    assert greedy_soup(same, _dist_score(torch.zeros(2)))[1] == ["x", "y"]


def test_greedy_soup_on_real_val_dice(finetune_zoo: Path, tiny_phantom_dataset: RawDataset) -> None:
    zoo = Zoo(finetune_zoo)
    soup = make_soup(zoo, TRIPLE, "A", "greedy", dataset=tiny_phantom_dataset)
    best_alone = max(e["score"] for e in soup.log)
    assert soup.log[0]["score"] == best_alone and soup.chosen[0] == soup.log[0]["ckpt_id"]
    assert mean_score(soup.val_dice.values()) >= best_alone
    assert set(soup.chosen) <= {c.ckpt_id for c in soup.candidates.checkpoints}
    # scored on site A's VALIDATION subjects only; a single run's score is its stored val Dice
    scorer = ValScorer(tiny_phantom_dataset, soup.spec, TRIPLE, soup.prep, "A")
    assert {m["case"] for m in scorer.val.meta} == set(tiny_phantom_dataset.cases_in("val", ["A"]))
    best = next(c for c in soup.candidates.checkpoints if c.ckpt_id == soup.chosen[0])
    stored = {t: best.metrics[t]["val_dice"] for t in TRIPLE}
    assert scorer.dice(zoo.load(best)) == pytest.approx(stored)


# ---- model folders, CLI and refusals ----------------------------------------------------------------------
def test_soup_folder_loads_and_exports(finetune_zoo: Path, tmp_path: Path, capsys) -> None:
    from weightzoo.segmenter import load_model, read_model_json

    out = tmp_path / "soup"
    args = ["zoo", "soup", "--zoo", finetune_zoo, "--task", "cord,gm,canal", "--site", "B"]
    rc, err = cli([*args, "--greedy", "--out", out], capsys)
    assert rc == 0, err
    seg = load_model(out, "cpu")
    assert seg.tasks == TRIPLE
    meta = read_model_json(out)
    info = meta["info"]
    assert meta["route"] == "soup" and info["method"] == "greedy" and info["selected_on"] == "val"
    assert info["base"] == Zoo(finetune_zoo).base_ids()[0]
    assert info["checkpoints"] and set(info["checkpoints"]) <= set(info["candidates"])
    json.dumps(info, allow_nan=False)  # plain JSON: no NaN or infinity
    rc, err = cli(["zoo", "export", out, tmp_path / "nnunet"], capsys)
    assert rc == 0, err
    assert list((tmp_path / "nnunet").rglob("checkpoint_final.pth"))
    dj = json.loads(next((tmp_path / "nnunet").rglob("dataset.json")).read_text())
    assert set(dj["labels"]) >= {"background", *TRIPLE}


def _random_init_zoo(path: Path, ds: RawDataset) -> Path:
    """Two cord runs on site A from different random inits (no base)."""
    prep = {"normalization": "zscore", "size": [32, 32], "axis": 2, "channels": 1}
    with Zoo(path, create=True, writable=True) as zoo:
        zoo.add_dataset(ds.name, ds.meta, {"path": str(ds.root), "preprocessing": prep})
        spec = ArchSpec.preset("tiny", 1, 1)
        for seed in (0, 1):
            rid = f"cord_A_{seed}"
            zoo.add_run(rid, spec, ["cord"], ["A"], "train", 1, {"seed": seed}, seed, ds.name)
            state = real_state_dict(build_network(spec, seed=seed))
            zoo.commit([PendingCheckpoint(rid, 1, "final", state)], done_runs=[rid])
    return path


def test_random_init_zoo_and_test_selection_are_refused(
    tiny_phantom_dataset: RawDataset, finetune_zoo: Path, tmp_path: Path, capsys
) -> None:
    zoo_dir = _random_init_zoo(tmp_path / "zoo", tiny_phantom_dataset)
    with pytest.raises(InputError, match="different basins"):
        select_candidates(Zoo(zoo_dir), ["cord"], "A")
    rc, err = cli(
        ["zoo", "soup", "--zoo", zoo_dir, "--task", "cord", "--site", "A", "--out", tmp_path / "s"], capsys
    )
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(zoo_dir) in err and "random inits" in err and "from:" in err
    args = ["zoo", "soup", "--zoo", finetune_zoo, "--task", "cord", "--site", "A", "--out", tmp_path / "t"]
    rc, err = cli([*args, "--greedy", "--select-on", "test"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--select-on val" in err
    assert not (tmp_path / "t").exists()


# ---- merges from a base -----------------------------------------------------------------------------------
def test_dare_with_p0_is_task_arithmetic_and_merges_start_from_the_base(finetune_zoo: Path) -> None:
    layout = TaskLayout(ArchSpec.preset("tiny", 1, 1), ["cord", "gm"])
    g = torch.Generator().manual_seed(0)
    init, a, b = (torch.randn(layout.numel, generator=g) for _ in range(3))
    ta = merge_vectors(layout, [a, b], ["cord", "gm"], "task-arithmetic", init, lam=0.7)
    assert torch.equal(merge_vectors(layout, [a, b], ["cord", "gm"], "dare", init, lam=0.7, drop=0.0), ta)
    d1 = merge_vectors(layout, [a, b], ["cord", "gm"], "dare", init, lam=0.7, drop=0.5, dare_seed=3)
    d2 = merge_vectors(layout, [a, b], ["cord", "gm"], "dare", init, lam=0.7, drop=0.5, dare_seed=3)
    assert torch.equal(d1, d2) and not torch.equal(d1, ta)
    with pytest.raises(InputError, match="drop rate"):
        merge_vectors(layout, [a, b], ["cord", "gm"], "dare", init, drop=1.0)

    zoo = Zoo(finetune_zoo)
    tasks = ["cord", "gm"]
    m_ta = merge_zoo(zoo, tasks, "task-arithmetic", site="A", lam=0.5)
    m_dare = merge_zoo(zoo, tasks, "dare", site="A", lam=0.5, drop=0.0)
    assert torch.equal(m_ta.vector, m_dare.vector)
    sp = m_ta.specialists
    assert sp.base == zoo.base_ids()[0] and all(zoo.run_base(r.run_id) == sp.base for r in sp.runs)
    # θ0 is the base restricted to the tasks: body = base + λ Σ (θ_k − base)
    lay = m_ta.layout
    base = lay.embed(zoo.base(sp.base).restricted(tasks)[1], tasks)[0]
    finals = [lay.embed(zoo.load(c), r.tasks)[0] for c, r in zip(sp.finals, sp.runs, strict=True)]
    body = body_mask(lay)
    want = base + 0.5 * ((finals[0] - base) + (finals[1] - base))
    assert torch.equal(m_ta.vector[body], want[body])


def test_merge_cli_dare_from_a_base(finetune_zoo: Path, tmp_path: Path, capsys) -> None:
    from weightzoo.segmenter import read_model_json

    out = tmp_path / "dare"
    args = ["merge", "-z", finetune_zoo, "-t", "cord,gm", "--method", "dare", "-s", "A", "--lambda", "0.5"]
    rc, err = cli([*args, "--drop", "0.5", "-o", out], capsys)
    assert rc == 0, err
    info = read_model_json(out)["info"]
    assert (
        info["method"] == "dare" and info["drop"] == 0.5 and info["base"] == Zoo(finetune_zoo).base_ids()[0]
    )
