"""The grouped batched trainer: M networks as one grouped-convolution network equal M separate networks,
stacked evaluation equals scoring each run alone, and a micro-preset zoo trained batched equals the
same runs trained one by one."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from weightzoo.data.slices import Preprocessing
from weightzoo.errors import InputError
from weightzoo.nets.unet import ArchSpec, build_network, count_parameters
from weightzoo.train.config import TrainConfig
from weightzoo.train.losses import DiceBCELoss
from weightzoo.zoo.base import is_trainable
from weightzoo.zoo.batched import StackedRuns, evaluate_stacked
from weightzoo.zoo.grid import Grid
from weightzoo.zoo.grouped import grouped_forward
from weightzoo.zoo.runs import Phases, evaluate_checkpoint, load_zoo_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _runs(preset: str, m: int, classes: int = 1) -> StackedRuns:
    spec = ArchSpec.preset(preset, num_classes=classes)
    cfgs = [TrainConfig(tasks=[f"t{k}" for k in range(classes)], preset=preset, seed=s) for s in range(m)]
    return StackedRuns.make(spec, cfgs, torch.device("cpu"))


@pytest.mark.parametrize("preset,classes", [("micro", 1), ("small", 2)])
def test_grouped_forward_equals_separate_networks(preset: str, classes: int) -> None:
    """Every run's logits and gradients equal its own network's (micro: no conv bias, one conv per
    stage; small: biases, two convs per stage, 4 stages, two outputs)."""
    runs = _runs(preset, 3, classes)
    x = torch.randn(3, 2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    params = {n: t.clone().requires_grad_(True) for n, t in runs.params.items()}
    out = grouped_forward(runs.base, params, x)
    assert out.shape == (3, 2, classes, 32, 32)
    out.square().mean(dim=(1, 2, 3, 4)).sum().backward()
    for m in range(3):
        p = {n: t[m].detach().clone().requires_grad_(True) for n, t in runs.params.items()}
        ref = functional_call(runs.base, p, (x[m],))
        assert (ref - out[m]).abs().max() < 1e-4
        ref.square().mean().backward()
        for n in p:  # the lower seg layers are unused without deep supervision: no gradient in both
            if p[n].grad is None:
                assert params[n].grad is None, n
            else:
                assert torch.allclose(p[n].grad, params[n].grad[m], atol=1e-5), n


def test_micro_preset_is_g_pt_sized() -> None:
    """3-10 k parameters and no conv biases (an InstanceNorm follows every conv)."""
    net = build_network(ArchSpec.preset("micro"))
    assert 3_000 <= count_parameters(net) <= 10_000
    assert not any(n.endswith("conv.bias") for n, _ in net.named_parameters())


def test_grouped_refuses_dropout() -> None:
    spec = ArchSpec.preset("micro", dropout=0.2)
    with pytest.raises(InputError, match="dropout"):
        grouped_forward(build_network(spec), {}, torch.zeros(1, 1, 1, 32, 32))


def _micro_runs(ds, seeds: list[int], **over) -> tuple[list, list]:
    grid = {
        "tasks": ["cord"],
        "sites": "each",
        "seeds": seeds,
        "preset": "micro",
        "steps": 10,
        "batch_size": 4,
        "checkpoints": 3,
        "size": [32, 32],
        **over,
    }
    plans = Grid(grid).expand(ds)
    data = load_zoo_data(ds, plans, Preprocessing("zscore", (32, 32), 2, ds.n_channels))
    return plans, [data.run_data(p, torch.device("cpu")) for p in plans]


def test_stacked_evaluation_equals_each_run_alone(tiny_phantom_dataset) -> None:
    plans, datas = _micro_runs(tiny_phantom_dataset, [0, 1])  # 2 seeds x 2 sites
    runs = StackedRuns.make(plans[0].spec(1), [p.config for p in plans], torch.device("cpu"))
    loss_fn = DiceBCELoss()
    which = [3, 0, 2]
    evs = evaluate_stacked(runs, which, [datas[m] for m in which], [["cord"]] * 3, loss_fn, None)
    for m, ev in zip(which, evs, strict=True):
        net = build_network(plans[m].spec(1))
        p = {n: t[m] for n, t in runs.params.items()}
        alone = evaluate_checkpoint(
            lambda x, p=p, net=net: functional_call(net, p, (x,)), datas[m], ["cord"], loss_fn
        )
        assert abs(alone["train_loss"] - ev["train_loss"]) < 1e-5
        assert abs(alone["val_loss"] - ev["val_loss"]) < 1e-5
        for k in ("val_dice", "val_loss"):
            assert abs(alone["metrics"]["cord"][k] - ev["metrics"]["cord"][k]) < 1e-5


def test_micro_batched_equals_sequential(tiny_phantom_dataset, alone_and_together) -> None:
    """6 micro runs (2 sites, 3 seeds, SGD) at 32 px: every checkpoint's weights and losses within 1e-4
    of the same run trained alone, and the profile saw every phase."""
    plans, datas = _micro_runs(tiny_phantom_dataset, [0, 1, 2])
    phases = Phases()
    alone, together = alone_and_together(plans, datas, phases=phases)
    assert alone.keys() == together.keys() and len(alone) == 6 * 5
    for key, a in alone.items():
        b = together[key]
        assert abs(a.val_loss - b.val_loss) < 1e-4 and abs(a.train_loss - b.train_loss) < 1e-4
        assert max((a.state[k] - b.state[k]).abs().max().item() for k in a.state) < 1e-4
    assert set(phases.seconds) == {"draw", "augment", "forward, backward", "update", "evaluate", "commit"}


@pytest.mark.parametrize("subset", ["all", "norm_seg"])
def test_finetunes_batched_equal_sequential(
    tiny_phantom_dataset, phantom_base, subset: str, alone_and_together
) -> None:
    """Fine-tunes of one base (the delta zoos) use the same batched builder: 4 runs (2 sites x 2 seeds,
    SGD) from the base train together; every checkpoint within 1e-4 of training alone, and tensors
    outside the trainable subset stay exactly the base's."""
    grid = {
        "tasks": ["cord"],
        "sites": "each",
        "seeds": 2,
        "trainable": subset,
        "steps": 8,
        "batch_size": 4,
        "checkpoints": 1,
        "from": str(phantom_base),  # 32 px, as the base
    }
    plans = Grid(grid).expand(tiny_phantom_dataset)
    data = load_zoo_data(tiny_phantom_dataset, plans, Preprocessing("zscore", (32, 32), 2, 1))
    datas = [data.run_data(p, torch.device("cpu")) for p in plans]
    alone, together = alone_and_together(plans, datas)
    assert alone.keys() == together.keys() and len(alone) == 4 * 3
    for (rid, step), a in alone.items():
        b = together[(rid, step)]
        assert max((a.state[k] - b.state[k]).abs().max().item() for k in a.state) < 1e-4
        first = together[(rid, 0)].state
        moved = {k for k in b.state if not torch.equal(b.state[k], first[k])}
        if step:
            assert moved and all(is_trainable(k, subset) for k in moved), sorted(moved)[:3]
