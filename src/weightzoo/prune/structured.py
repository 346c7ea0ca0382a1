"""Structured (channel) pruning of a PlainConvUNet that returns a smaller PlainConvUNet.

Every convolution's output channels form a *group*: the conv's weight rows, its bias and its norm's
affine parameters (producers), and the input slices of every layer that reads them (consumers):
the next conv of the stage; for a stage's last encoder conv the next stage AND, through the skip
connection, the decoder stage at the same resolution (the second half of its concatenated input);
for a transposed conv the first half of that input; for a decoder stage's last conv the next
transposed conv and its seg layer. Removing a channel removes it from producers and consumers at
once, so the result is a plain network with smaller `features_per_stage`: it loads in `segment`,
`evaluate`, the zoo and, through `zoo export`, in nnU-Net — and runs faster, unlike masks.

Every group of a stage keeps the same number of channels (PlainConvUNet has one width per stage),
rounded to multiples of `round_to` (8: odd widths are slow on CPUs and GPUs, Torch-Pruning's
`round_to`), but each group keeps its own best channels. Which channels are best is a strategy:
override `ChannelStrategy.channel_scores`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from weightzoo.errors import InputError
from weightzoo.nets.unet import (
    ArchSpec,
    build_network,
    check_state_dict,
    load_real_state_dict,
    real_state_dict,
)
from weightzoo.prune.metrics import flops


@dataclass
class Group:
    """The output channels of one conv: who produces them, who reads them (offset into its input)."""

    name: str
    stage: int  # resolution stage; its width is features_per_stage[stage]
    producers: list[tuple[str, int]]  # (state key, dim)
    consumers: list[tuple[str, int, int]] = field(default_factory=list)  # (state key, dim, offset)
    norm_weight: str | None = None  # the |γ| the default strategy scores


def _conv_group(name: str, prefix: str, stage: int, state: dict[str, torch.Tensor]) -> Group:
    producers = [(f"{prefix}.conv.weight", 0)]
    norm = None
    for key in ("conv.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"):
        if f"{prefix}.{key}" in state:
            producers.append((f"{prefix}.{key}", 0))
    if f"{prefix}.norm.weight" in state:
        norm = f"{prefix}.norm.weight"
    return Group(name, stage, producers, norm_weight=norm)


def channel_groups(spec: ArchSpec, state: dict[str, torch.Tensor]) -> list[Group]:
    """All channel groups of the PlainConvUNet `spec` (state: its real_state_dict)."""
    kw = spec.arch_kwargs
    n, feats = spec.n_stages, kw["features_per_stage"]
    enc_convs, dec_convs = kw["n_conv_per_stage"], kw["n_conv_per_stage_decoder"]
    if n < 2:
        raise InputError(
            "a one-stage network has no channels to prune safely", "prune a U-Net with ≥ 2 stages"
        )
    groups: list[Group] = []
    for s in range(n):
        for j in range(enc_convs[s]):
            g = _conv_group(f"encoder.{s}.{j}", f"encoder.stages.{s}.0.convs.{j}", s, state)
            if j + 1 < enc_convs[s]:
                g.consumers.append((f"encoder.stages.{s}.0.convs.{j + 1}.conv.weight", 1, 0))
            elif s + 1 < n:
                g.consumers.append((f"encoder.stages.{s + 1}.0.convs.0.conv.weight", 1, 0))
                # skip connection: decoder stage n-2-s reads cat(transposed conv output, skip)
                g.consumers.append((f"decoder.stages.{n - 2 - s}.convs.0.conv.weight", 1, feats[s]))
            else:
                g.consumers.append(("decoder.transpconvs.0.weight", 0, 0))
            groups.append(g)
    for d in range(n - 1):
        s = n - 2 - d
        t = Group(f"transpconv.{d}", s, [(f"decoder.transpconvs.{d}.weight", 1)])
        if f"decoder.transpconvs.{d}.bias" in state:
            t.producers.append((f"decoder.transpconvs.{d}.bias", 0))
        t.consumers.append((f"decoder.stages.{d}.convs.0.conv.weight", 1, 0))
        groups.append(t)
        for j in range(dec_convs[d]):
            g = _conv_group(f"decoder.{d}.{j}", f"decoder.stages.{d}.convs.{j}", s, state)
            if j + 1 < dec_convs[d]:
                g.consumers.append((f"decoder.stages.{d}.convs.{j + 1}.conv.weight", 1, 0))
            else:
                if d + 1 < n - 1:
                    g.consumers.append((f"decoder.transpconvs.{d + 1}.weight", 0, 0))
                g.consumers.append((f"decoder.seg_layers.{d}.weight", 1, 0))
            groups.append(g)
    missing = [k for g in groups for k, *_ in g.producers + g.consumers if k not in state]
    if missing:
        raise InputError(
            f"the network's layout is not nnU-Net's PlainConvUNet (no {missing[0]})",
            "structured pruning supports PlainConvUNet model folders written by weightzoo or nnU-Net",
        )
    return groups


def shrink(
    spec: ArchSpec, state: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]
) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
    """Keep, for each group name, the channel indices `keep[name]`; every group of a stage must keep
    the same number. Returns the smaller network's spec and state (checked to fit it)."""
    groups = channel_groups(spec, state)
    widths: dict[int, int] = {}
    for g in groups:
        k = len(keep[g.name])
        if widths.setdefault(g.stage, k) != k:
            raise ValueError(
                f"stage {g.stage}: groups keep different channel counts ({widths[g.stage]} vs {k})"
            )
    # (key, dim) -> [(offset, kept indices)]: a consumer's input may hold two groups (skip concat)
    index: dict[tuple[str, int], list[tuple[int, torch.Tensor]]] = {}
    for g in groups:
        idx = torch.as_tensor(keep[g.name], dtype=torch.long).sort().values
        for key, dim in g.producers:
            index.setdefault((key, dim), []).append((0, idx))
        for key, dim, offset in g.consumers:
            index.setdefault((key, dim), []).append((offset, idx))
    new_state = {}
    for key, value in state.items():
        v = value
        for dim in range(value.dim()):
            parts = index.get((key, dim))
            if parts:
                v = v.index_select(dim, torch.cat([off + i for off, i in sorted(parts, key=lambda p: p[0])]))
        new_state[key] = v.contiguous()
    kw = copy.deepcopy(spec.arch_kwargs)
    kw["features_per_stage"] = [widths.get(s, f) for s, f in enumerate(kw["features_per_stage"])]
    new_spec = ArchSpec(kw, spec.input_channels, spec.num_classes, spec.network_class_name)
    check_state_dict(new_spec, new_state, "structured pruning")
    return new_spec, new_state


class ChannelStrategy:
    """Scores the channels of one group; each group keeps its top-scoring ones. Override `channel_scores`."""

    name = "channels"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def channel_scores(self, group: Group, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Network slimming (Liu et al. 2017): |γ| of the channel's norm. An instance norm divides
        out the filter's scale, so a filter's L1 norm says nothing; γ is what scales the channel.
        A transposed conv (no norm) is scored by the L1 norm of its filters."""
        if group.norm_weight is not None:
            return state[group.norm_weight].abs().float()
        key, dim = group.producers[0]
        w = state[key].float()
        return w.abs().transpose(0, dim).flatten(1).sum(1)


class RandomChannels(ChannelStrategy):
    """Uniformly random channels: the structured sanity baseline."""

    name = "channels-random"

    def channel_scores(self, group, state):
        n = state[group.producers[0][0]].shape[group.producers[0][1]]
        return torch.rand(n, generator=self.generator)


CHANNEL_STRATEGIES: dict[str, type[ChannelStrategy]] = {s.name: s for s in (ChannelStrategy, RandomChannels)}


def stage_widths(features: list[int], multiplier: float, round_to: int) -> list[int]:
    """features × multiplier, rounded to multiples of round_to, at least min(round_to, f), at most f."""
    out = []
    for f in features:
        w = round_to * round(f * multiplier / round_to)
        out.append(int(min(f, max(min(round_to, f), w))))
    return out


def widths_for_speedup(
    spec: ArchSpec, speedup: float, input_shape: tuple[int, ...], round_to: int = 8
) -> tuple[list[int], float]:
    """The widest rounded stage widths whose dense FLOPs are ≤ 1/speedup of the original's, and the
    theoretical speedup they give. FLOPs scale ~ width², so the multiplier starts near 1/√speedup."""
    if not speedup >= 1:
        raise InputError(f"speedup {speedup} is not ≥ 1", "give e.g. --speedup 2")
    base = flops(build_network(spec), input_shape)["flops"]
    feats = spec.arch_kwargs["features_per_stage"]
    last: tuple[list[int], float] = (feats, 1.0)
    for i in range(100, 0, -1):
        widths = stage_widths(feats, i / 100, round_to)
        kw = {**copy.deepcopy(spec.arch_kwargs), "features_per_stage": widths}
        got = (
            base
            / flops(build_network(ArchSpec(kw, spec.input_channels, spec.num_classes)), input_shape)["flops"]
        )
        last = (widths, got)
        if got >= speedup:
            return last
    raise InputError(
        f"speedup {speedup}× is out of reach: the narrowest network ({last[0]}) gives {last[1]:.2f}×",
        "ask for a smaller --speedup or a smaller --round-to",
    )


def prune_channels(
    spec: ArchSpec,
    net: torch.nn.Module,
    widths: list[int],
    strategy: ChannelStrategy,
) -> tuple[ArchSpec, torch.nn.Module]:
    """Prune `net` (of `spec`) to stage `widths`, each group keeping its best channels."""
    state = {k: v.detach().cpu() for k, v in real_state_dict(net).items()}
    keep = {}
    for g in channel_groups(spec, state):
        scores = strategy.channel_scores(g, state)
        keep[g.name] = torch.sort(scores, descending=True, stable=True).indices[: widths[g.stage]]
    new_spec, new_state = shrink(spec, state, keep)
    return new_spec, load_real_state_dict(build_network(new_spec), new_state)
