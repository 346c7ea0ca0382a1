"""ParamLayout (flat vectors, per-tensor statistics), permutation symmetry and weight matching."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from weightzoo.errors import ModelError
from weightzoo.nets.unet import (
    ArchSpec,
    build_network,
    count_parameters,
    load_real_state_dict,
    real_state_dict,
)
from weightzoo.zoo.params import (
    ParamLayout,
    TensorStats,
    align_to,
    channel_groups,
    permute_unet,
    random_permutations,
    state_distance,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets train 10-30x slower with 2 threads when the 2 cores are shared; one is plenty."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _perturbed(spec: ArchSpec, seed: int) -> torch.nn.Module:
    """A network whose every parameter (norm affine included) is distinct, like a trained one."""
    net = build_network(spec, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def _outputs(spec: ArchSpec, state: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Every seg layer's output (deep supervision on, so all seg layers are exercised), in float64."""
    net = build_network(spec).double()
    load_real_state_dict(net, {k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    net.decoder.deep_supervision = True
    net.eval()
    with torch.no_grad():
        return list(net(x.double()))


# ---- layout ------------------------------------------------------------------------------------------
def test_layout_flatten_unflatten_round_trip():
    spec = ArchSpec.preset("tiny", input_channels=2, num_classes=3)
    layout = ParamLayout.for_spec(spec)
    assert ParamLayout.for_spec(ArchSpec.preset("tiny", 2, 3)) is layout  # cached by hash
    net = _perturbed(spec, 0)
    assert layout.numel == count_parameters(net)
    assert layout.names == [k for k, _ in net.named_parameters()]
    full = net.state_dict()
    assert any(k.startswith("decoder.encoder.") for k in full)  # aliases exist ...
    vec = layout.flatten(full)
    assert vec.shape == (layout.numel,) and vec.dtype == torch.float32
    assert torch.equal(vec, layout.flatten(real_state_dict(net)))  # ... and are not counted twice
    back = layout.unflatten(vec)
    assert list(back) == layout.names
    assert all(torch.equal(back[k], v) for k, v in real_state_dict(net).items())
    for name, s in layout.slices.items():
        assert torch.equal(vec[s], full[name].reshape(-1))
    load_real_state_dict(build_network(spec), back)  # loads into a fresh network
    d = json.loads(json.dumps(layout.to_dict()))
    assert d["numel"] == layout.numel and d["arch_hash"] == spec.hash()
    # every tensor belongs to exactly one layer; layers know their stage and channel groups
    in_layers = [t for layer in layout.layers for t in layer.tensors]
    assert sorted(in_layers) == sorted(layout.names)
    kinds = {layer.kind for layer in layout.layers}
    assert kinds == {"conv", "norm", "transpconv", "seg"}
    seg = [layer for layer in layout.layers if layer.kind == "seg"]
    assert len(seg) == spec.n_stages - 1 and all(layer.out_group is None for layer in seg)


def test_layout_rejects_foreign_states():
    layout = ParamLayout.for_spec(ArchSpec.preset("tiny"))
    other = real_state_dict(build_network(ArchSpec.preset("tiny", num_classes=2)))
    with pytest.raises(ModelError, match="shape"):
        layout.flatten(other)
    with pytest.raises(ModelError, match="lacks"):
        layout.flatten({})
    with pytest.raises(ModelError, match="does not fit"):
        layout.unflatten(torch.zeros(layout.numel + 1))


def test_tensor_stats_streaming_matches_direct():
    spec = ArchSpec.preset("tiny")
    layout = ParamLayout.for_spec(spec)
    vecs = torch.stack([layout.flatten(_perturbed(spec, s).state_dict()) for s in range(6)])
    stats = layout.tensor_stats(vecs)
    streamed = layout.tensor_stats([vecs[:1], vecs[1:4], vecs[4:]])
    for i, t in enumerate(layout.tensors):
        block = vecs[:, t.offset : t.offset + t.numel].double()
        assert stats.mean[i].item() == pytest.approx(block.mean().item(), abs=1e-12)
        assert stats.std[i].item() == pytest.approx(block.std(unbiased=False).item(), abs=1e-12)
    torch.testing.assert_close(streamed.mean, stats.mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(streamed.std, stats.std, atol=1e-12, rtol=0)
    z = stats.normalize(layout, vecs)
    i = layout.names.index("decoder.transpconvs.0.weight")
    s = layout.slices["decoder.transpconvs.0.weight"]
    assert z[:, s].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert z[:, s].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert stats.count == 6 and stats.std[i] > 0
    torch.testing.assert_close(stats.denormalize(layout, z), vecs, atol=1e-5, rtol=1e-5)
    again = TensorStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert torch.equal(again.mean, stats.mean) and again.names == stats.names


# ---- permutation symmetry ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "in_ch", "classes"), [("tiny", 1, 1), ("tiny", 3, 3), ("small", 1, 1), ("small", 2, 4)]
)
def test_permuted_network_computes_the_same_function(preset, in_ch, classes):
    spec = ArchSpec.preset(preset, input_channels=in_ch, num_classes=classes)
    net = _perturbed(spec, 1)
    full = net.state_dict()  # nnU-Net's, aliases included: they must follow their tensor
    perms = random_permutations(spec, torch.Generator().manual_seed(7))
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = permute_unet(full, spec, perms)
    assert set(permuted) == set(full)
    # weights really moved: every tensor with a hidden-channel axis changed, input/output order kept
    layout = ParamLayout.for_spec(spec)
    same = [n for n in layout.names if torch.equal(permuted[n], full[n])]
    assert same == [f"decoder.seg_layers.{d}.bias" for d in range(spec.n_stages - 1)]  # task axis only
    assert torch.equal(permuted["decoder.encoder.stages.0.0.convs.0.conv.weight"],
                       permuted["encoder.stages.0.0.convs.0.conv.weight"])  # fmt: skip
    assert state_distance(full, permuted, spec) > 1.0
    x = torch.randn(2, in_ch, 32, 32, generator=torch.Generator().manual_seed(3))
    for a, b in zip(_outputs(spec, full, x), _outputs(spec, permuted, x), strict=True):
        assert a.shape[1] == classes
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_permutation_with_batchnorm_buffers_and_dropout():
    kwargs = copy.deepcopy(ArchSpec.preset("tiny", dropout=0.2).arch_kwargs)
    kwargs["norm_op"] = "torch.nn.modules.batchnorm.BatchNorm2d"
    spec = ArchSpec(kwargs, input_channels=1, num_classes=2)
    net = _perturbed(spec, 2)
    g = torch.Generator().manual_seed(5)
    for m in net.modules():  # running statistics must be permuted with their channels
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    layout = ParamLayout.for_spec(spec)
    assert {t.kind for t in layout.tensors} == {"param", "buffer"}
    full = net.state_dict()
    assert any(".all_modules.2." in k for k in full)  # conv, dropout, norm: aliases at index 2
    permuted = permute_unet(full, spec, random_permutations(spec, torch.Generator().manual_seed(1)))
    x = torch.randn(2, 1, 32, 32, generator=g)
    for a, b in zip(_outputs(spec, full, x), _outputs(spec, permuted, x), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert torch.equal(layout.flatten(layout.unflatten(layout.flatten(full))), layout.flatten(full))


def test_permute_rejects_bad_permutations():
    spec = ArchSpec.preset("tiny")
    state = real_state_dict(build_network(spec))
    perms = random_permutations(spec)
    with pytest.raises(ModelError, match="not a permutation"):
        permute_unet(state, spec, {**perms, "enc0.0": torch.tensor([0, 0, 1, 2])})
    with pytest.raises(ModelError, match="not a permutation"):
        permute_unet(state, spec, {k: v for k, v in perms.items() if k != "up0"})
    with pytest.raises(ModelError, match="does not have"):
        permute_unet({**state, "extra.weight": torch.zeros(1)}, spec, perms)
    assert channel_groups(spec) == {
        "enc0.0": 4, "enc1.0": 8, "enc2.0": 16, "up0": 8, "dec0.0": 8, "up1": 4, "dec1.0": 4
    }  # fmt: skip


# ---- weight matching ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_align_recovers_a_permuted_copy_exactly(preset):
    spec = ArchSpec.preset(preset, num_classes=2)
    ref = real_state_dict(_perturbed(spec, 3))
    shuffled = permute_unet(ref, spec, random_permutations(spec, torch.Generator().manual_seed(11)))
    assert state_distance(ref, shuffled, spec) > 1.0
    aligned, perms = align_to(ref, shuffled, spec)
    assert state_distance(ref, aligned, spec) == 0.0
    assert all(torch.equal(aligned[k], ref[k]) for k in ref)
    assert set(perms) == set(channel_groups(spec))


def _train(spec: ArchSpec, seed: int, x: torch.Tensor, y: torch.Tensor, steps: int = 40) -> torch.nn.Module:
    net = build_network(spec, seed=seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:8]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def test_align_independently_trained_runs():
    spec = ArchSpec.preset("tiny")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.randn(24, 1, 36, 36, generator=g), 5, 1)  # smooth blobs, 32 px
    y = (x > 0.1).float()
    a = real_state_dict(_train(spec, 1, x, y))
    b = real_state_dict(_train(spec, 2, x, y))
    before = state_distance(a, b, spec)
    aligned, _ = align_to(a, b, spec)
    after = state_distance(a, aligned, spec)
    assert after < 0.95 * before, (before, after)
    test_x = torch.randn(2, 1, 32, 32, generator=g)
    for o1, o2 in zip(_outputs(spec, b, test_x), _outputs(spec, aligned, test_x), strict=True):
        torch.testing.assert_close(o2, o1, atol=1e-5, rtol=0)
