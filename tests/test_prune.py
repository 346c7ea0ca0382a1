"""Pruning (issue 14): exact fractions, masks kept through fine-tuning, FLOPs against PyTorch's own
counter, channel pruning that keeps the function and stays a PlainConvUNet, round trips, clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from weightzoo.cli import main
from weightzoo.data.slices import Preprocessing, load_slices
from weightzoo.errors import InputError
from weightzoo.nets.unet import ArchSpec, build_network, load_real_state_dict, real_state_dict
from weightzoo.prune.metrics import flops, sizes
from weightzoo.prune.model import PruneRecipe, prune_and_finetune
from weightzoo.prune.strategies import STRATEGIES, apply_masks, gradients, prunable
from weightzoo.prune.structured import (
    ChannelStrategy,
    channel_groups,
    prune_channels,
    shrink,
    widths_for_speedup,
)
from weightzoo.segmenter import load_model, save_model
from weightzoo.train.losses import DiceBCELoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec3d() -> ArchSpec:
    kw = copy.deepcopy(ArchSpec.preset("tiny").arch_kwargs)
    kw.update(
        conv_op="torch.nn.modules.conv.Conv3d",
        norm_op="torch.nn.modules.instancenorm.InstanceNorm3d",
        kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    )
    return ArchSpec(kw, 1, 2)


def _randomised(spec: ArchSpec, seed: int = 0) -> torch.nn.Module:
    """A network whose norms' γ, β are random too (a fresh init has γ = 1 everywhere)."""
    net = build_network(spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize(
    "spec,shape",
    [
        (ArchSpec.preset("small", 1, 2), (2, 1, 32, 32)),
        (ArchSpec.preset("tiny", 3, 1), (1, 3, 40, 24)),
        (_spec3d(), (1, 1, 16, 16, 8)),
    ],
    ids=["2d-small", "2d-tiny-odd", "3d"],
)
def test_flops_agree_with_torch_flop_counter(spec, shape) -> None:
    net = build_network(spec, seed=0).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(shape))
    theirs = counter.get_total_flops()
    ours = flops(net, shape)
    assert abs(ours["flops"] - theirs) <= 0.01 * theirs
    assert ours["nonzero_flops"] == ours["flops"]  # a dense net
    # pruning half of every kernel halves the nonzero FLOPs of every layer, and only those
    apply_masks(net, STRATEGIES["layer-magnitude"]().masks(net, 1.0))
    with torch.no_grad():
        for p in prunable(net).values():
            p.view(-1)[: p.numel() // 2] = 0
    assert flops(net, shape)["flops"] == ours["flops"]
    assert flops(net, shape)["nonzero_flops"] < 0.55 * ours["flops"]


@pytest.mark.parametrize("method", sorted(STRATEGIES))
@pytest.mark.parametrize("ratio", [2.0, 8.0, 10.0])
def test_each_strategy_prunes_exactly_the_asked_compression(method: str, ratio: float) -> None:
    spec = ArchSpec.preset("tiny", 1, 2)
    net = _randomised(spec)
    strategy = STRATEGIES[method](seed=3)
    grads = None
    if strategy.needs_gradients:
        x, y = torch.randn(4, 1, 32, 32), (torch.rand(4, 2, 32, 32) > 0.5).float()
        grads = gradients(net, lambda n: DiceBCELoss()(n(x), y))
    masks = strategy.masks(net, ratio, grads)
    apply_masks(net, masks)
    s = sizes(net)
    assert s["nonzero_size"] == round(s["size"] / ratio)  # exactly, to the weight
    # only kernels are pruned: norms, biases and the output layers are untouched
    pruned_names = {k for k, m in masks.items() if (m == 0).any()}
    assert pruned_names and all(".seg_layers." not in k and k.endswith("weight") for k in pruned_names)
    if strategy.layerwise:  # the same fraction of every layer, up to one weight of rounding
        fractions = [float((m == 0).float().mean()) for m in masks.values()]
        sizes_ = [m.numel() for m in masks.values()]
        assert all(
            abs(f - fractions[0]) <= 1.0 / n + 1.0 / sizes_[0] for f, n in zip(fractions, sizes_, strict=True)
        )


def test_random_and_magnitude_pick_differently_and_random_is_seeded() -> None:
    net = _randomised(ArchSpec.preset("tiny", 1, 1))
    a = STRATEGIES["random"](seed=1).masks(net, 4.0)
    b = STRATEGIES["random"](seed=1).masks(net, 4.0)
    c = STRATEGIES["global-magnitude"]().masks(net, 4.0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    kept = torch.cat([p.detach().abs().flatten()[c[k].flatten() > 0] for k, p in prunable(net).items()])
    gone = torch.cat([p.detach().abs().flatten()[c[k].flatten() == 0] for k, p in prunable(net).items()])
    assert gone.max() <= kept.min()  # global magnitude removes exactly the smallest weights


def test_impossible_ratios_are_clear_errors() -> None:
    net = build_network(ArchSpec.preset("tiny", 1, 1), seed=0)
    with pytest.raises(InputError, match=r"only .* are prunable"):
        STRATEGIES["global-magnitude"]().masks(net, 1e6)
    with pytest.raises(InputError, match="not ≥ 1"):
        STRATEGIES["global-magnitude"]().masks(net, 0.5)


@pytest.mark.parametrize("spec", [ArchSpec.preset("small", 1, 2), _spec3d()], ids=["2d", "3d"])
def test_keeping_every_channel_is_the_identity(spec) -> None:
    state = {k: v.detach() for k, v in real_state_dict(_randomised(spec)).items()}
    feats = spec.arch_kwargs["features_per_stage"]
    keep = {g.name: torch.arange(feats[g.stage]) for g in channel_groups(spec, state)}
    new_spec, new_state = shrink(spec, state, keep)
    assert new_spec.hash() == spec.hash()
    assert all(torch.equal(state[k], new_state[k]) for k in state)


@pytest.mark.parametrize(
    "spec,shape", [(ArchSpec.preset("small", 1, 2), (2, 1, 32, 32)), (_spec3d(), (1, 1, 16, 16, 8))]
)
def test_removing_silent_channels_keeps_the_function(spec, shape) -> None:
    """Channels whose output is exactly zero (γ = β = 0 before the ReLU, or a zero transposed-conv
    filter) are what channel pruning removes first; removing them must not change the output."""
    net = _randomised(spec)
    feats = spec.arch_kwargs["features_per_stage"]
    widths = [max(2, f // 2) if s in (1, 2) else f for s, f in enumerate(feats)]
    state = dict(real_state_dict(net))
    with torch.no_grad():
        for g in channel_groups(spec, state):
            silent = torch.arange(widths[g.stage], feats[g.stage])
            if g.norm_weight is not None:
                state[g.norm_weight][silent] = 0
                state[g.norm_weight.replace("weight", "bias")][silent] = 0
            else:
                for key, dim in g.producers:
                    state[key].index_fill_(dim, silent, 0.0)
    net.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    new_spec, small = prune_channels(spec, net, widths, ChannelStrategy())
    assert new_spec.arch_kwargs["features_per_stage"] == widths
    assert small.__class__.__name__ == "PlainConvUNet"
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), net(x), rtol=1e-5, atol=1e-5)


def test_speedup_search_rounds_widths_and_reaches_the_target() -> None:
    spec = ArchSpec.preset("small", 1, 2)
    widths, got = widths_for_speedup(spec, 2.0, (1, 1, 64, 64), round_to=8)
    assert got >= 2.0 and all(w % 8 == 0 for w in widths)
    assert widths_for_speedup(spec, 1.0, (1, 1, 64, 64))[0] == spec.arch_kwargs["features_per_stage"]
    with pytest.raises(InputError, match="out of reach"):
        widths_for_speedup(spec, 1000.0, (1, 1, 64, 64))


@pytest.fixture(scope="module")
def tiny_model(tiny_phantom_dataset, tmp_path_factory) -> Path:
    """An (untrained, randomised) tiny two-task model folder at 32 px on the phantom dataset."""
    spec = ArchSpec.preset("tiny", 1, 2)
    folder = tmp_path_factory.mktemp("prune") / "model"
    info = {"dataset": tiny_phantom_dataset.name, "sites": tiny_phantom_dataset.sites()}
    return save_model(
        folder, _randomised(spec), spec, ["cord", "gm"], Preprocessing(size=(32, 32)), 1.0, info=info
    )


def test_masks_stay_zero_through_finetuning_and_the_folder_round_trips(
    tiny_model: Path, tiny_phantom_dataset, tmp_path: Path
) -> None:
    seg = load_model(tiny_model, "cpu")
    train = load_slices(
        tiny_phantom_dataset, seg.tasks, prep=seg.preprocessing, cases=tiny_phantom_dataset.cases_in("train")
    )
    recipe = PruneRecipe("global-gradient", ratio=5.0, finetune_steps=6, batch_size=4, seed=1)
    tuned, info = prune_and_finetune(
        seg, recipe, tmp_path / "p", train, None, "cpu", progress=False, timing=False
    )
    recipe0 = PruneRecipe("global-gradient", ratio=5.0, finetune_steps=0, seed=1)
    untuned, _ = prune_and_finetune(
        seg, recipe0, tmp_path / "p0", train, None, "cpu", progress=False, timing=False
    )
    before, after = real_state_dict(untuned.net), real_state_dict(tuned.net)
    moved = 0
    for k, p in prunable(untuned.net).items():
        zero = p == 0
        assert (after[k][zero] == 0).all()  # pruned weights stay pruned
        moved += int((after[k][~zero] != before[k][~zero]).sum())
    assert moved > 0  # and the others were fine-tuned
    assert info["pruned"]["compression"] == pytest.approx(5.0, rel=1e-3)
    meta = json.loads((tmp_path / "p" / "model.json").read_text())
    assert meta["route"] == "prune" and meta["info"]["prune"]["recipe"]["method"] == "global-gradient"
    again = load_model(tmp_path / "p", "cpu")  # bit-exact reload
    assert all(torch.equal(v, real_state_dict(again.net)[k]) for k, v in after.items())


def test_structured_model_exports_to_nnunet_bit_exactly(tiny_model: Path, tmp_path: Path) -> None:
    from weightzoo.zoo.exchange import export_model_folder
    from weightzoo.zoo.nnunet import read_nnunet_results

    seg = load_model(tiny_model, "cpu")
    out = tmp_path / "ch"
    small, info = prune_and_finetune(
        seg, PruneRecipe("channels", speedup=2.0, round_to=2), out, progress=False
    )
    assert small.spec.arch_kwargs["features_per_stage"] != seg.spec.arch_kwargs["features_per_stage"]
    assert info["pruned"]["theoretical_speedup"] >= 2.0
    assert info["pruned"]["size"] == small.n_params < seg.n_params
    with pytest.warns(Warning):
        pth = export_model_folder(out, tmp_path / "nn")
    (ckpt,) = read_nnunet_results(pth.parent.parent)
    spec, state = ckpt.spec, ckpt.state
    assert spec.hash() == small.spec.hash()
    assert all(torch.equal(state[k], v) for k, v in real_state_dict(small.net).items())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        theirs = load_real_state_dict(build_network(spec), state).eval()(x)
        assert torch.equal(theirs, small.net(x))


def test_prune_cli_run_bench_and_errors(
    tiny_model: Path, tiny_phantom_dataset, tmp_path: Path, capsys
) -> None:
    ds = str(tiny_phantom_dataset.root)
    bench = tmp_path / "bench"
    args = ["prune", "bench", "-m", str(tiny_model), "-d", ds, "-o", str(bench), "--methods", "global-magnitude,random,channels",
            "--ratios", "4", "--speedups", "2", "--seeds", "1", "--finetune-steps", "2", "--batch-size", "4",
            "--round-to", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((bench / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} == {
        "unpruned+finetune",
        "global-magnitude",
        "random",
        "channels",
    }
    assert (bench / "report.html").exists() and (bench / "figures" / "prune_curves.png").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in (bench / "cells").iterdir()}
    assert main(args) == 0  # resumes: every cell is read back, none re-run
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (bench / "cells").iterdir()}
    capsys.readouterr()
    bad = [
        (["--method", "channels", "--ratio", "4"], "give --speedup"),
        (["--method", "global-magnitude", "--speedup", "2"], "give --ratio"),
        (["--method", "magnitude", "--ratio", "4"], "unknown pruning method"),
        (["--method", "global-magnitude", "--ratio", "0.5"], "not ≥ 1"),
        (["--method", "global-gradient", "--ratio", "4"], "add --dataset"),
        (["--method", "global-magnitude", "--ratio", "4", "--finetune-steps", "5"], "add --dataset"),
    ]
    assert (
        main(
            [
                "prune",
                "run",
                "-m",
                str(tiny_model),
                "-o",
                str(tiny_model),
                "--method",
                "random",
                "--ratio",
                "2",
            ]
        )
        == 2
    )
    assert "holds another model" in capsys.readouterr().err  # the source model is never overwritten
    for extra, message in bad:
        code = main(["prune", "run", "-m", str(tiny_model), "-o", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err.lower() and "Traceback" not in err, (extra, err)
