"""Weight generation: task layout, the diffusion model, training pairs, sampling, checks, merging, CLI.

The zoo here is hand-made with the store's API (tiny U-Nets; each run drifts from its seeded
initialisation along its own direction, and its recorded val Dice grows with the step), so the tests
exercise the generator's plumbing in seconds; `benchmarks/generate_eval.py` measures real zoos.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.generate.diffusion import ENCODERS, DiffusionConfig, ParamDiffusion, Tokenizer
from weightzoo.generate.merge import body_mask, merge_vectors, ties_vector
from weightzoo.generate.sample import Generator, Start
from weightzoo.generate.train import (
    GenTrainConfig,
    load_pairs,
    read_state,
    select_runs,
    train_generator,
    update_rms,
)
from weightzoo.generate.vectors import TaskLayout
from weightzoo.nets.unet import ArchSpec, build_network, load_real_state_dict, real_state_dict
from weightzoo.zoo.store import PendingCheckpoint, Zoo

STEPS = (0, 4, 8, 12)
TINY = {"steps": 24, "batch_size": 8, "checkpoint_every": 8, "log_every": 8, "warmup": 4}


def cli(args: list[object]) -> int:
    from weightzoo.cli import main

    return main([str(a) for a in args])


def _run_id(tasks: tuple[str, ...], site: str, seed: int, split: str) -> str:
    return f"{'+'.join(tasks)}_{site}_{seed}_{split}"


def make_zoo(path: Path, ds: RawDataset, entries: list[tuple[tuple[str, ...], str, int, str]]) -> Zoo:
    """A zoo of tiny U-Nets: run = (tasks, site, seed, split); checkpoints at STEPS."""
    zoo = Zoo(path, create=True, writable=True)
    prep = {"normalization": "zscore", "size": [32, 32], "axis": 2, "channels": 1}
    zoo.add_dataset(ds.name, ds.meta, {"path": str(ds.root), "preprocessing": prep})
    for tasks, site, seed, split in entries:
        spec = ArchSpec.preset("tiny", 1, len(tasks))
        rid = _run_id(tasks, site, seed, split)
        cfg = {"preset": "tiny", "size": [32, 32], "tasks": list(tasks), "seed": seed, "steps": STEPS[-1]}
        zoo.add_run(
            rid, spec, tasks, [site], split, len(STEPS), cfg, seed, ds.name, info={"preprocessing": prep}
        )
        init = real_state_dict(build_network(spec, seed=seed))
        g = torch.Generator().manual_seed(100 + seed + 7 * len(tasks))
        drift = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in init.items()}
        items = []
        for s in STEPS:
            f = s / STEPS[-1]
            d = 0.1 + 0.8 * f
            items.append(
                PendingCheckpoint(
                    rid,
                    s,
                    "init" if s == 0 else "final" if s == STEPS[-1] else "random",
                    {k: v + f * drift[k] for k, v in init.items()},
                    train_loss=1 - d,
                    val_loss=1 - d,
                    metrics={t: {"val_dice": d} for t in tasks},
                )
            )
        zoo.commit(items, done_runs=[rid])
    return zoo


ENTRIES = [
    (tasks, site, seed, "train")
    for tasks in [("cord",), ("gm",), ("cord", "gm")]
    for site in "AB"
    for seed in (0, 1)
] + [
    (("cord",), "A", 5, "val"),
    (("gm",), "B", 6, "val"),
    (("cord",), "A", 7, "test"),
    (("cord", "gm"), "B", 8, "test"),
]


@pytest.fixture(scope="module")
def zoo_path(tmp_path_factory: pytest.TempPathFactory, tiny_phantom_dataset: RawDataset) -> Path:
    path = tmp_path_factory.mktemp("genzoo") / "zoo"
    make_zoo(path, tiny_phantom_dataset, ENTRIES).close()
    return path


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory: pytest.TempPathFactory, zoo_path: Path) -> Path:
    out = tmp_path_factory.mktemp("gen") / "gen"
    train_generator(zoo_path, out, GenTrainConfig(**TINY))
    return out


# ---- layout and model -------------------------------------------------------------------------------
def test_task_layout_embeds_single_and_multi_task_states_and_extracts_them_back() -> None:
    body = ArchSpec.preset("tiny", 1, 1)
    layout = TaskLayout(body, ["canal", "cord", "gm"])
    single = real_state_dict(build_network(body, seed=1))
    vec, mask = layout.embed(single, ["gm"])
    back = layout.extract(vec, ["gm"])
    assert all(torch.equal(back[k], single[k]) for k in single)
    assert int((~mask).sum()) == 2 * (8 + 1 + 4 + 1)  # canal and cord rows of both seg layers
    assert bool((vec[~mask] == 0).all())
    multi = real_state_dict(build_network(body.with_classes(2), seed=2))
    vec2, _ = layout.embed(multi, ["cord", "canal"])
    back2 = layout.extract(vec2, ["cord", "canal"])
    assert all(torch.equal(back2[k], multi[k]) for k in multi)
    one = layout.extract(vec2, ["canal"])  # a single output of a multi-task net
    assert torch.equal(one["decoder.seg_layers.1.bias"], multi["decoder.seg_layers.1.bias"][1:])
    with pytest.raises(UnknownNameError, match="choose one of: canal, cord, gm"):
        layout.embed(single, ["spleen"])


def test_permutation_index_keeps_the_network_function() -> None:
    body = ArchSpec.preset("tiny", 1, 1)
    layout = TaskLayout(body, ["cord", "gm"])
    state = real_state_dict(build_network(body.with_classes(2), seed=3))
    vec, _ = layout.embed(state, ["cord", "gm"])
    idx = layout.perm_index(torch.Generator().manual_seed(0))
    assert torch.equal(idx.sort().values, torch.arange(layout.numel)) and not torch.equal(
        idx, torch.arange(layout.numel)
    )
    x = torch.randn(2, 1, 32, 32)
    net = build_network(layout.spec).eval()
    with torch.no_grad():
        y0 = load_real_state_dict(net, layout.extract(vec, ["cord", "gm"]))(x)
        y1 = load_real_state_dict(net, layout.extract(vec[idx], ["cord", "gm"]))(x)
    assert (y0 - y1).abs().max() < 1e-5


@pytest.mark.parametrize("encoder", ENCODERS)
def test_model_shapes_and_untrained_model_predicts_no_update(encoder: str) -> None:
    layout = TaskLayout(ArchSpec.preset("tiny", 1, 1), ["cord", "gm"])
    cfg = DiffusionConfig.preset("tiny", encoder=encoder, d_model=32, n_layers=1)
    tok = Tokenizer(layout.layout, cfg.chunk)
    v = torch.randn(3, layout.numel)
    assert tok.tokens(v).shape == (3, tok.n_tokens, cfg.chunk)
    assert torch.equal(tok.vector(tok.tokens(v)), v)
    assert tok.n_tokens >= len(layout.layout.layers)  # a chunk never spans two layers
    model = ParamDiffusion(layout.layout, 2, 2, cfg)
    metrics = torch.tensor([[0.5, math.nan]] * 3)
    out = model(
        torch.randn(3, layout.numel), torch.tensor([0, 500, 999]), v, metrics, metrics, torch.zeros(3, 2)
    )
    assert out.shape == v.shape and not out.any()  # zero-initialised decoder: update = 0
    with pytest.raises(UnknownNameError, match="encoder"):
        DiffusionConfig(encoder="per_token")


# ---- training data and training ---------------------------------------------------------------------
def test_training_pairs_come_only_from_training_runs(zoo_path: Path, gen_dir: Path) -> None:
    zoo = Zoo(zoo_path)
    runs, _, body = select_runs(zoo, "train", GenTrainConfig(**TINY))
    assert {r.split for r in runs} == {"train"} and len(runs) == 12
    layout = TaskLayout(body, ["cord", "gm"])
    data = load_pairs(zoo, runs, layout, ["A", "B"])
    i, j = data.pairs[:, 0], data.pairs[:, 1]
    assert torch.equal(data.run_of[i], data.run_of[j])  # same run
    steps = torch.tensor([int(c.rsplit("-", 1)[1]) for c in data.ckpt_ids])
    assert bool((steps[i] < steps[j]).all())  # j later than i
    assert len(data.pairs) == 12 * math.comb(len(STEPS), 2)
    trained_on = set(Generator.load(gen_dir, "cpu").meta["train_runs"])
    not_train = {r.run_id for r in zoo.runs() if r.split != "train"}
    assert trained_on == {r.run_id for r in runs} and not trained_on & not_train
    # metrics: the single-task runs have no value for the other task
    cord_only = next(k for k, r in enumerate(runs) if r.tasks == ["cord"])
    row = data.metrics[data.run_of == cord_only][0]
    assert math.isfinite(row[0]) and math.isnan(row[1])


def test_update_rms_is_the_rms_over_every_training_pair(zoo_path: Path) -> None:
    """The closed form (per run, n · Σ (θ_k − θ̄)²) equals the brute-force sum over all pairs."""
    zoo = Zoo(zoo_path)
    runs, _, body = select_runs(zoo, "train", GenTrainConfig(**TINY))
    layout = TaskLayout(body, ["cord", "gm"])
    data = load_pairs(zoo, runs, layout, ["A", "B"])
    ids = layout.layout.segment_ids()
    sq = torch.zeros(len(layout.layout.tensors), dtype=torch.float64)
    cnt = torch.zeros_like(sq)
    for i, j in data.pairs.tolist():
        m = data.masks[data.run_of[i]].double()
        d = (data.vectors[j] - data.vectors[i]).double() * m
        sq.index_add_(0, ids, d * d)
        cnt.index_add_(0, ids, m)
    brute = (sq / cnt.clamp_min(1)).sqrt().float()
    got = update_rms(data, layout)
    assert torch.allclose(got, brute, rtol=1e-5, atol=0) and torch.equal(got == 0, brute == 0)


def test_generator_training_resumes_to_the_same_weights(
    zoo_path: Path, gen_dir: Path, tmp_path: Path
) -> None:
    res = train_generator(zoo_path, tmp_path / "g", GenTrainConfig(**TINY), stop_after=12)
    assert res.steps == 12 and (tmp_path / "g" / "checkpoint.safetensors").exists()
    train_generator(zoo_path, tmp_path / "g", GenTrainConfig(**TINY))
    a, _ = read_state(tmp_path / "g" / "generator.safetensors")
    b, _ = read_state(gen_dir / "generator.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (tmp_path / "g" / "checkpoint.safetensors").exists()
    assert train_generator(zoo_path, tmp_path / "g", GenTrainConfig(**TINY)).skipped
    with pytest.raises(ModelError, match="trained differently"):
        train_generator(zoo_path, tmp_path / "g", GenTrainConfig(**{**TINY, "seed": 1}))


# ---- sampling -----------------------------------------------------------------------------------------
def test_sampling_is_deterministic_in_its_seed(gen_dir: Path) -> None:
    gen = Generator.load(gen_dir, "cpu")
    a = gen.sample(["cord"], 0.9, site="A", candidates=3, seed=4)
    b = gen.sample(["cord"], 0.9, site="A", candidates=3, seed=4)
    c = gen.sample(["cord"], 0.9, site="A", candidates=3, seed=5)
    assert a.vectors.shape == (3, gen.layout.numel)
    assert torch.equal(a.vectors, b.vectors) and not torch.equal(a.vectors, c.vectors)
    assert not torch.equal(a.vectors[0], a.vectors[1])  # candidates differ
    gm_rows = ~gen.layout.mask(["cord"])
    assert bool((a.vectors[:, gm_rows] == 0).all())  # no output for a task that was not asked for
    rec = gen.sample(["cord", "gm"], {"cord": 0.9, "gm": 0.8}, site=None, steps=2, ddim_steps=3, seed=1)
    assert rec.steps == 2 and torch.isfinite(rec.vectors).all()
    zoo = Zoo(gen.meta["zoo"])
    from_ckpt = gen.sample(
        ["cord"], 0.95, site="A", start=Start.from_zoo(zoo, "cord_A_7_test-0000004"), seed=0
    )
    assert from_ckpt.start == "zoo:cord_A_7_test-0000004" and torch.isfinite(from_ckpt.vectors).all()


def test_nan_and_out_of_range_outputs_are_refused(gen_dir: Path, tmp_path: Path) -> None:
    gen = Generator.load(gen_dir, "cpu")
    vec = gen.sample(["cord"], 0.9, site="A").vectors[0]
    assert gen.problems(vec, ["cord"]) == []
    bad = vec.clone()
    bad[5] = math.nan
    with pytest.raises(ModelError, match="NaN or inf") as e:
        gen.save(bad, ["cord"], tmp_path / "net", 0.0, {})
    assert "\n" not in str(e.value) and not (tmp_path / "net").exists()
    huge = vec * 100
    with pytest.raises(ModelError, match="outside the zoo's range"):
        gen.check(huge, ["cord"])


def test_unknown_task_or_site_lists_the_known_ones(gen_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = Generator.load(gen_dir, "cpu")
    with pytest.raises(UnknownNameError, match=r"unknown task 'spleen'.*choose one of: cord, gm"):
        gen.sample(["spleen"], 0.9)
    with pytest.raises(UnknownNameError, match=r"unknown site 'Z'.*choose one of: A, B"):
        gen.sample(["cord"], 0.9, site="Z")
    with pytest.raises(InputError, match="outside"):
        gen.sample(["cord"], 1.5)
    rc = cli(
        ["generate", "sample", "-g", gen_dir, "-t", "cord", "-s", "Z", "--target-dice", "0.9", "-o", "x"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "unknown site 'Z'" in err and "A, B" in err


def test_cli_sample_writes_a_model_folder_that_segment_accepts(
    gen_dir: Path, tiny_phantom_dataset: RawDataset, tmp_path: Path
) -> None:
    from weightzoo.segmenter import load_model, read_model_json

    net = tmp_path / "net"
    args = [
        "generate",
        "sample",
        "-g",
        gen_dir,
        "-t",
        "cord",
        "-s",
        "A",
        "--target-dice",
        "0.9",
        "--from-init",
        3,
    ]
    assert cli([*args, "--candidates", 3, "--select-on", "val", "--steps", 2, "-o", net]) == 0
    meta = read_model_json(net)
    assert meta["route"] == "generate" and meta["tasks"] == ["cord"]
    assert meta["info"]["selected_on"] == "val" and len(meta["info"]["val_dice_candidates"]) == 3
    seg = load_model(net, "cpu")
    image = tiny_phantom_dataset.image_files(tiny_phantom_dataset.cases()[0])[0]
    out = tmp_path / "seg.nii.gz"
    assert cli(["segment", "-i", image, "-m", net, "-o", out]) == 0
    assert out.exists() and seg.n_params > 0
    assert cli([*args, "--select-on", "test", "-o", tmp_path / "n2"]) == 2  # never the test split


# ---- merging ------------------------------------------------------------------------------------------
def test_merging_baselines_on_hand_made_states() -> None:
    layout = TaskLayout(ArchSpec.preset("tiny", 1, 1), ["cord", "gm"])
    body = body_mask(layout)
    init = torch.zeros(layout.numel)
    a = torch.zeros(layout.numel)
    b = torch.zeros(layout.numel)
    a[body] = 1.0
    b[body] = 3.0
    a[layout.mask(["cord"]) & ~body] = 5.0  # cord specialist's seg rows
    b[layout.mask(["gm"]) & ~body] = 7.0
    avg = merge_vectors(layout, [a, b], ["cord", "gm"], "average")
    assert bool((avg[body] == 2.0).all())
    assert bool((avg[layout.mask(["cord"]) & ~body] == 5.0).all()) and bool(
        (avg[layout.mask(["gm"]) & ~body] == 7.0).all()
    )
    ta = merge_vectors(layout, [a, b], ["cord", "gm"], "task-arithmetic", init, lam=0.5)
    assert bool((ta[body] == 2.0).all())  # 0 + 0.5 * (1 + 3)
    with pytest.raises(InputError, match="common initialisation"):
        merge_vectors(layout, [a, b], ["cord", "gm"], "ties")
    # TIES by hand: trim to the top half, elect the sign of the sum, average the agreeing entries
    tv = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-2.0, -4.0, 0.1, 1.0]])
    # trimmed: [3, 0, 0, 2] and [-2, -4, 0, 0]; signs of sums: +, -, 0, +
    assert torch.allclose(ties_vector(tv, density=0.5), torch.tensor([3.0, -4.0, 0.0, 2.0]))


def test_merge_cli_stacks_specialists_into_one_network(zoo_path: Path, tmp_path: Path) -> None:
    from weightzoo.segmenter import load_model, read_model_json

    for method in ("average", "task-arithmetic", "ties"):
        out = tmp_path / method
        assert cli(["merge", "-z", zoo_path, "-t", "cord,gm", "--method", method, "-s", "A", "-o", out]) == 0
        meta = read_model_json(out)
        assert meta["tasks"] == ["cord", "gm"] and meta["route"] == "merge"
        assert set(meta["info"]["specialists"]) == {"cord", "gm"}
        assert load_model(out, "cpu").spec.num_classes == 2
    zoo = Zoo(zoo_path)
    seg = load_model(tmp_path / "ties", "cpu")
    cord_final = zoo.load(meta["info"]["specialists"]["cord"])
    w = real_state_dict(seg.net)["decoder.seg_layers.1.weight"]
    assert torch.equal(w[:1], cord_final["decoder.seg_layers.1.weight"])  # row 0 = the cord specialist's
    assert cli(["merge", "-z", zoo_path, "-t", "cord,lesion", "-o", tmp_path / "x"]) == 2


def test_zoo_export_accepts_generated_and_merged_model_folders(
    zoo_path: Path, gen_dir: Path, tiny_phantom_dataset: RawDataset, tmp_path: Path
) -> None:
    """`net/` and `merged/` go to nnU-Net results folders bit-exactly, with the dataset's label values."""
    from weightzoo.segmenter import load_model
    from weightzoo.zoo.nnunet import read_checkpoint

    net, merged = tmp_path / "net", tmp_path / "merged"
    sample = ["generate", "sample", "-g", gen_dir, "-t", "cord", "-s", "A", "--target-dice", "0.9"]
    assert cli([*sample, "--from-init", 3, "-o", net]) == 0
    assert (
        cli(["merge", "-z", zoo_path, "-t", "cord,gm", "--method", "average", "-s", "A", "-o", merged]) == 0
    )
    for folder in (net, merged):
        out = tmp_path / f"nnunet_{folder.name}"
        assert cli(["zoo", "export", folder, out]) == 0
        (pth,) = out.glob("Dataset*/nnUNetTrainer__nnUNetPlans__2d/fold_0/checkpoint_final.pth")
        ck = read_checkpoint(pth)
        seg = load_model(folder, "cpu")
        assert ck.spec == seg.spec
        mine = real_state_dict(seg.net)
        assert mine.keys() == ck.state.keys() and all(torch.equal(mine[k], ck.state[k]) for k in mine)
        labels = (pth.parent.parent / "dataset.json").read_text()
        for t in seg.tasks:  # the phantom dataset's own label values, not 1..K
            assert str(tiny_phantom_dataset.task_labels(t)[0]) in labels and t in labels
        assert pth.parent.parent.parent.name == tiny_phantom_dataset.name
        assert cli(["zoo", "export", folder, out]) == 2  # exists: --overwrite needed
        assert cli(["zoo", "export", folder, out, "--overwrite"]) == 0
    assert cli(["zoo", "export", net, tmp_path / "a", tmp_path / "b"]) == 2  # model folder: one output
    assert cli(["zoo", "export", zoo_path, tmp_path / "c"]) == 2  # zoo: a checkpoint id is needed


# ---- evaluation and demo --------------------------------------------------------------------------------
def test_generate_eval_scores_selected_networks_on_test(
    zoo_path: Path, gen_dir: Path, tiny_phantom_dataset: RawDataset, tmp_path: Path
) -> None:
    from weightzoo.generate.evaluate import evaluate_generators

    res = evaluate_generators(
        [gen_dir],
        zoo_path,
        tiny_phantom_dataset,
        tmp_path / "ev",
        candidates=2,
        parts=("best", "multitask"),
        log=str,
    )
    assert {(r["task"], r["site"]) for r in res["best"]} == {
        ("cord", "A"),
        ("cord", "B"),
        ("gm", "A"),
        ("gm", "B"),
    }
    for r in res["best"]:
        assert 0.0 <= r["zoo best test"] <= 1.0 and len(r["generated one-shot"]) == 1
    nets = {r["network"].split(" (")[0] for r in res["multitask"]}
    assert {"specialists", "generated one-shot", "average", "task-arithmetic", "ties"} <= nets
    assert (tmp_path / "ev" / "summary.json").exists() and (tmp_path / "ev" / "report.html").exists()
    with pytest.raises(UnknownNameError, match="evaluation part"):
        evaluate_generators([gen_dir], zoo_path, tiny_phantom_dataset, tmp_path / "x", parts=("speed",))


def test_demo_generate_shows_a_generated_network_next_to_the_zoo_best(
    zoo_path: Path, tiny_phantom_dataset: RawDataset, tmp_path: Path
) -> None:
    from weightzoo.evaluate.report import Report
    from weightzoo.generate.demo import demo_generate

    rep = Report(tmp_path / "report", "demo")
    out = demo_generate(tmp_path / "demo", zoo_path, tiny_phantom_dataset, rep, log=str, seconds_budget=0)
    assert out["generator_steps"] == 60  # the minimum
    assert 0.0 <= out["zoo_best_test_dice"] <= 1.0 and "generated_test_dice" in out
    assert out["from_held_out_checkpoint"] is not None  # the fake zoo has val/test runs of cord
    html = rep.write().read_text()
    assert "Generated weights" in html and out["zoo_best_checkpoint"] in html
