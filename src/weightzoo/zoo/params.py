"""A network's parameters as one vector, and the channel-permutation symmetry of a PlainConvUNet.

`ParamLayout` fixes the order of the real tensors of an ArchSpec (`named_parameters()`, then any
buffers such as BatchNorm running statistics; nnU-Net's aliased state-dict keys like
`decoder.encoder.*` and `convs.0.all_modules.0` appear once), so a checkpoint is a 1-D vector and a
zoo is a matrix [N, numel]. `TensorStats` holds per-tensor mean/std for normalising such vectors.

Hidden channels of a U-Net can be permuted without changing its function: a conv's output channels
(and its bias, the following norm's affine and running statistics) together with the next layers'
input channels. Each such channel space is a *group*; `channel_groups(spec)` names them:

    enc{s}.{j}   output of encoder stage s, conv j (the last conv of stage s is also the skip)
    up{d}        output of decoder transposed conv d
    dec{d}.{j}   output of decoder stage d, conv j

Decoder stage d's first conv reads cat(up{d}, skip), so its input axis is two segments permuted by
two groups. Transposed-conv weights are [in, out, *k]. Network inputs and outputs (tasks) are never
permuted. `permute_unet` applies permutations (augmentation); `align_to` finds those that bring one
run closest to a reference (weight matching, Ainsworth et al. 2023, "Git Re-Basin").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from weightzoo.errors import ModelError
from weightzoo.nets.unet import ArchSpec, build_network

# one segment of a tensor axis: (group, offset, length); an axis is a list of segments.
Segment = tuple[str, int, int]


@dataclass(frozen=True)
class TensorInfo:
    """One real tensor in the flat vector: `vec[offset:offset+numel].view(shape)`."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    dtype: str  # torch dtype name, e.g. "float32"
    kind: str  # "param" | "buffer"
    layer: str  # module path, e.g. "decoder.transpconvs.0"


@dataclass(frozen=True)
class Layer:
    """A module with parameters: the unit a weight generator tokenises.

    kind: conv | norm | transpconv | seg; stage: "encoder.S" or "decoder.D"; block: the conv block
    (conv + norm) it belongs to; out_group/in_groups: channel groups of its output/input axes
    (None/() where the axis is the network's input or output, which is never permuted)."""

    name: str
    kind: str
    stage: str
    block: str
    tensors: tuple[str, ...]
    out_group: str | None
    in_groups: tuple[str, ...]


# ---- wiring: which tensor axis is permuted by which group ---------------------------------------
def _per_stage(value: Any, n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


@dataclass(frozen=True)
class _Wiring:
    groups: dict[str, int]  # group -> channel count
    axes: dict[str, dict[int, list[Segment]]]  # tensor name -> {axis: segments}
    layers: tuple[Layer, ...]


def _build_wiring(spec: ArchSpec, real: Mapping[str, torch.Tensor]) -> _Wiring:
    """Trace PlainConvUNet's structure (PlainConvEncoder + UNetDecoder of dynamic_network_architectures)."""
    kw = spec.arch_kwargs
    n = spec.n_stages
    feats = _per_stage(kw["features_per_stage"], n)
    n_conv = _per_stage(kw["n_conv_per_stage"], n)
    n_conv_dec = _per_stage(kw["n_conv_per_stage_decoder"], n - 1)
    groups: dict[str, int] = {}
    axes: dict[str, dict[int, list[Segment]]] = {}
    layers: list[Layer] = []

    def add(module: str, kind: str, stage: str, block: str, out: str | None, inp: list[Segment]) -> None:
        names = tuple(k for k in real if k.rsplit(".", 1)[0] == module)
        if not names:
            raise ModelError(f"expected parameters under {module!r} in {spec.network_class_name}")
        for name in names:
            t = real[name]
            a: dict[int, list[Segment]] = {}
            if t.dim() == 0:  # e.g. BatchNorm num_batches_tracked
                pass
            elif kind in ("conv", "seg") and name.endswith(".weight"):
                if out is not None:
                    a[0] = [(out, 0, t.shape[0])]
                if inp:
                    a[1] = inp
            elif kind == "transpconv" and name.endswith(".weight"):  # [in, out, *k]
                a[0] = inp
                a[1] = [(out, 0, t.shape[1])] if out else []
            elif out is not None:  # biases, norm affine and running statistics
                a[0] = [(out, 0, t.shape[0])]
            axes[name] = a
        in_groups = tuple(dict.fromkeys(g for g, _, _ in inp))
        layers.append(Layer(module, kind, stage, block, names, out, in_groups))

    def conv_block(prefix: str, stage: str, group: str, size: int, inp: list[Segment]) -> None:
        groups[group] = size
        add(f"{prefix}.conv", "conv", stage, prefix, group, inp)
        if any(k.startswith(f"{prefix}.norm.") for k in real):
            add(f"{prefix}.norm", "norm", stage, prefix, group, [])

    prev: list[Segment] = []  # network input: not permuted
    skips: list[str] = []
    for s in range(n):
        for j in range(n_conv[s]):
            g = f"enc{s}.{j}"
            conv_block(f"encoder.stages.{s}.0.convs.{j}", f"encoder.{s}", g, feats[s], prev)
            prev = [(g, 0, feats[s])]
        skips.append(prev[0][0])
    below = skips[-1]
    for d in range(n - 1):
        c = feats[n - 2 - d]
        up, mod = f"up{d}", f"decoder.transpconvs.{d}"
        groups[up] = c
        add(mod, "transpconv", f"decoder.{d}", mod, up, [(below, 0, feats[n - 1 - d])])
        prev = [(up, 0, c), (skips[n - 2 - d], c, c)]  # torch.cat((upsampled, skip), 1)
        for j in range(n_conv_dec[d]):
            g = f"dec{d}.{j}"
            conv_block(f"decoder.stages.{d}.convs.{j}", f"decoder.{d}", g, c, prev)
            prev = [(g, 0, c)]
        seg = f"decoder.seg_layers.{d}"
        add(seg, "seg", f"decoder.{d}", seg, None, prev)  # output channels = tasks: never permuted
        below = prev[0][0]

    unwired = [k for k in real if k not in axes]
    if unwired:
        raise ModelError(f"permutation wiring does not cover {unwired[:2]} (unexpected network layout)")
    return _Wiring(groups, axes, tuple(layers))


# ---- the layout ------------------------------------------------------------------------------------
_CACHE: dict[str, ParamLayout] = {}


class ParamLayout:
    """The real tensors of one ArchSpec in a fixed order, and how they sit in a flat vector."""

    def __init__(self, spec: ArchSpec):
        net = build_network(spec, seed=0)
        real: dict[str, torch.Tensor] = {k: v.detach() for k, v in net.named_parameters()}
        n_params = len(real)
        real.update({k: v.detach() for k, v in net.named_buffers()})
        # nnU-Net's state_dict key -> the real key holding the same tensor (aliases share storage)
        by_id = {id(v): k for k, v in net.state_dict(keep_vars=True).items() if k in real}
        self.aliases: dict[str, str] = {
            k: by_id[id(v)] for k, v in net.state_dict(keep_vars=True).items() if id(v) in by_id
        }
        self.spec = spec
        self.spec_hash = spec.hash()
        self._wiring = _build_wiring(spec, real)
        layer_of = {t: layer.name for layer in self._wiring.layers for t in layer.tensors}
        infos, offset = [], 0
        for i, (name, t) in enumerate(real.items()):
            kind = "param" if i < n_params else "buffer"
            dtype = str(t.dtype).removeprefix("torch.")
            infos.append(TensorInfo(name, tuple(t.shape), offset, t.numel(), dtype, kind, layer_of[name]))
            offset += t.numel()
        self.tensors: tuple[TensorInfo, ...] = tuple(infos)
        self.numel = offset

    @classmethod
    def for_spec(cls, spec: ArchSpec) -> ParamLayout:
        """The layout of `spec`, built once per `spec.hash()`."""
        h = spec.hash()
        if h not in _CACHE:
            _CACHE[h] = cls(spec)
        return _CACHE[h]

    # ---- description ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [t.shape for t in self.tensors]

    @property
    def slices(self) -> dict[str, slice]:
        return {t.name: slice(t.offset, t.offset + t.numel) for t in self.tensors}

    @property
    def layers(self) -> tuple[Layer, ...]:
        """Modules with parameters in forward order (encoder stages, then per decoder stage:
        transposed conv, conv blocks, seg layer)."""
        return self._wiring.layers

    @property
    def groups(self) -> dict[str, int]:
        """Permutable channel groups -> channel count."""
        return dict(self._wiring.groups)

    def segment_ids(self) -> torch.Tensor:
        """[numel] int64: index of the tensor each element belongs to (for per-tensor reductions)."""
        counts = torch.tensor([t.numel for t in self.tensors])
        return torch.repeat_interleave(torch.arange(len(self.tensors)), counts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, for the zoo manifest."""
        return {
            "arch_hash": self.spec_hash,
            "numel": self.numel,
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "offset": t.offset,
                    "numel": t.numel,
                    "dtype": t.dtype,
                    "kind": t.kind,
                    "layer": t.layer,
                }
                for t in self.tensors
            ],
            "layers": [
                {
                    "name": layer.name,
                    "kind": layer.kind,
                    "stage": layer.stage,
                    "block": layer.block,
                    "tensors": list(layer.tensors),
                    "out_group": layer.out_group,
                    "in_groups": list(layer.in_groups),
                }
                for layer in self.layers
            ],
            "groups": self.groups,
        }

    # ---- vectors -------------------------------------------------------------------------------
    def flatten(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """State dict (nnU-Net's full one, aliases included, or a real one) -> [numel] vector."""
        missing = [t.name for t in self.tensors if t.name not in state]
        if missing:
            raise ModelError(
                f"state dict lacks {len(missing)} tensor(s) of architecture {self.spec_hash} (first: {missing[0]})",
                "the checkpoint belongs to another architecture",
            )
        parts = []
        for t in self.tensors:
            v = state[t.name]
            if tuple(v.shape) != t.shape:
                raise ModelError(
                    f"tensor {t.name} has shape {tuple(v.shape)}, architecture {self.spec_hash} expects {t.shape}",
                    "the checkpoint belongs to another architecture",
                )
            parts.append(v.detach().reshape(-1).to("cpu", dtype))
        return torch.cat(parts)

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """[numel] vector -> real state dict (own memory, each tensor in its original dtype)."""
        if vec.dim() != 1 or vec.numel() != self.numel:
            raise ModelError(
                f"vector of shape {tuple(vec.shape)} does not fit architecture {self.spec_hash}",
                f"expected a 1-D vector of {self.numel} values",
            )
        return {
            t.name: vec[t.offset : t.offset + t.numel].reshape(t.shape).to(getattr(torch, t.dtype)).clone()
            for t in self.tensors
        }

    def tensor_stats(self, vectors: torch.Tensor | Iterable[torch.Tensor]) -> TensorStats:
        """Per-tensor mean/std over a [N, numel] matrix or an iterable of such batches (streaming)."""
        acc = StatsAccumulator(self)
        if isinstance(vectors, torch.Tensor):
            acc.update(vectors)
        else:
            for batch in vectors:
                acc.update(batch)
        return acc.result()


# ---- per-tensor statistics --------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorStats:
    """Mean and std of every tensor's elements over a set of checkpoints ([T] each, float64)."""

    names: tuple[str, ...]
    mean: torch.Tensor
    std: torch.Tensor
    count: int  # number of vectors

    def expand(self, layout: ParamLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element mean and std ([numel] float32 each); std is floored at 1e-8 (constant tensors)."""
        if tuple(layout.names) != self.names:
            raise ModelError("statistics were computed for another parameter layout")
        ids = layout.segment_ids()
        return self.mean[ids].float(), self.std.clamp_min(1e-8)[ids].float()

    def normalize(self, layout: ParamLayout, vectors: torch.Tensor) -> torch.Tensor:
        """[..., numel] -> per-tensor standardised values."""
        mean, std = self.expand(layout)
        return (vectors - mean.to(vectors.device)) / std.to(vectors.device)

    def denormalize(self, layout: ParamLayout, vectors: torch.Tensor) -> torch.Tensor:
        mean, std = self.expand(layout)
        return vectors * std.to(vectors.device) + mean.to(vectors.device)

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorStats:
        try:
            return cls(
                tuple(d["names"]),
                torch.tensor(d["mean"], dtype=torch.float64),
                torch.tensor(d["std"], dtype=torch.float64),
                int(d["count"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"not valid tensor statistics ({e!r})", "recompute them") from None


class StatsAccumulator:
    """Streaming per-tensor mean/variance (Chan et al. pairwise merge), so a zoo larger than memory
    can be summarised batch by batch."""

    def __init__(self, layout: ParamLayout):
        self.layout = layout
        self._ids = layout.segment_ids()
        self._sizes = torch.tensor([t.numel for t in layout.tensors], dtype=torch.float64)
        self.n = 0  # vectors seen
        self._mean = torch.zeros(len(layout.tensors), dtype=torch.float64)
        self._m2 = torch.zeros(len(layout.tensors), dtype=torch.float64)

    def update(self, vectors: torch.Tensor) -> None:
        """Add a [N, numel] (or [numel]) batch."""
        v = vectors.detach().to("cpu", torch.float64)
        v = v[None] if v.dim() == 1 else v
        if v.dim() != 2 or v.shape[1] != self.layout.numel:
            raise ModelError(
                f"batch of shape {tuple(vectors.shape)} does not fit the layout ({self.layout.numel})"
            )
        nb = v.shape[0]
        if nb == 0:
            return
        k = len(self.layout.tensors)
        count = self._sizes * nb  # elements per tensor in this batch
        s = torch.zeros(k, dtype=torch.float64).index_add_(0, self._ids, v.sum(0))
        mean_b = s / count
        dev = (v - mean_b[self._ids]).pow(2).sum(0)
        m2_b = torch.zeros(k, dtype=torch.float64).index_add_(0, self._ids, dev)
        count_a = self._sizes * self.n
        total = count_a + count
        delta = mean_b - self._mean
        self._mean = self._mean + delta * count / total
        self._m2 = self._m2 + m2_b + delta.pow(2) * count_a * count / total
        self.n += nb

    def result(self) -> TensorStats:
        if self.n == 0:
            raise ModelError("no vectors to compute statistics from", "add at least one checkpoint")
        std = (self._m2 / (self._sizes * self.n)).sqrt()
        return TensorStats(tuple(self.layout.names), self._mean.clone(), std, self.n)


# ---- permutation symmetry -----------------------------------------------------------------------------
def channel_groups(spec: ArchSpec) -> dict[str, int]:
    """Permutable hidden-channel groups of `spec` -> channel count (see the module docstring)."""
    return ParamLayout.for_spec(spec).groups


def identity_permutations(spec: ArchSpec) -> dict[str, torch.Tensor]:
    return {g: torch.arange(c) for g, c in channel_groups(spec).items()}


def random_permutations(spec: ArchSpec, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One uniformly random permutation per channel group ({group: int64 [C]})."""
    return {g: torch.randperm(c, generator=generator) for g, c in channel_groups(spec).items()}


def _axis_index(segments: list[Segment], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([off + perms[g].to("cpu", torch.long) for g, off, _ in segments])


def _permute_tensor(
    t: torch.Tensor,
    axes: Mapping[int, list[Segment]],
    perms: Mapping[str, torch.Tensor],
    skip_axis: int | None = None,
) -> torch.Tensor:
    for axis, segments in axes.items():
        if axis != skip_axis and segments:
            t = t.index_select(axis, _axis_index(segments, perms).to(t.device))
    return t


def permute_unet(
    state: Mapping[str, torch.Tensor], spec: ArchSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Permute hidden channels: new channel i of group g is old channel perms[g][i].

    `state` may be nnU-Net's full state dict (aliases included: they are permuted like the tensor
    they alias) or a real one; the result has the same keys. The network's function is unchanged."""
    layout = ParamLayout.for_spec(spec)
    wiring = layout._wiring
    for g, c in wiring.groups.items():
        p = perms.get(g)
        if p is None or p.numel() != c or not torch.equal(torch.sort(p.cpu()).values, torch.arange(c)):
            raise ModelError(
                f"perms[{g!r}] is not a permutation of {c} channels", "use random_permutations(spec)"
            )
    out = {}
    for key, t in state.items():
        real = layout.aliases.get(key)
        if real is None:
            raise ModelError(f"state has key {key!r}, which architecture {layout.spec_hash} does not have")
        out[key] = _permute_tensor(t, wiring.axes[real], perms)
    return out


def _real_state(layout: ParamLayout, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [n for n in layout.names if n not in state]
    if missing:
        raise ModelError(f"state lacks {missing[0]} of architecture {layout.spec_hash}")
    return {n: state[n] for n in layout.names}


def state_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], spec: ArchSpec) -> float:
    """L2 distance between two states' parameters (float64)."""
    layout = ParamLayout.for_spec(spec)
    va, vb = layout.flatten(a, torch.float64), layout.flatten(b, torch.float64)
    return float((va - vb).norm())


def align_to(
    reference: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    spec: ArchSpec,
    iterations: int = 100,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weight matching: permutations of `state` that maximise sum <reference, permuted state>.

    Coordinate ascent over channel groups (in a seeded random order each sweep); each step solves a
    linear assignment (scipy) with the other groups fixed, and is kept only if it improves the
    objective, so the distance never grows. Stops when a sweep changes nothing or after `iterations`
    sweeps. Returns (aligned real state dict, perms); aligned == permute_unet(state, spec, perms)."""
    layout = ParamLayout.for_spec(spec)
    wiring = layout._wiring
    ref = {k: v.detach().to("cpu", torch.float64) for k, v in _real_state(layout, reference).items()}
    cur = {k: v.detach().to("cpu", torch.float64) for k, v in _real_state(layout, state).items()}
    uses: dict[str, list[tuple[str, int, int, int]]] = {g: [] for g in wiring.groups}
    for name, axes in wiring.axes.items():
        for axis, segments in axes.items():
            for g, off, length in segments:
                uses[g].append((name, axis, off, length))
    perms = identity_permutations(spec)
    rng = np.random.default_rng(seed)
    names = list(wiring.groups)
    for _ in range(iterations):
        changed = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            c = wiring.groups[g]
            cost = torch.zeros(c, c, dtype=torch.float64)
            for name, axis, off, length in uses[g]:
                wa = ref[name].movedim(axis, 0)[off : off + length].reshape(length, -1)
                wb = _permute_tensor(cur[name], wiring.axes[name], perms, skip_axis=axis)
                wb = wb.movedim(axis, 0)[off : off + length].reshape(length, -1)
                cost += wa @ wb.T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(c)
            gain = cost[rows, new].sum() - cost[rows, perms[g]].sum()
            if gain > 1e-12 * max(1.0, float(cost.abs().max())):
                perms[g] = new
                changed = True
        if not changed:
            break
    aligned = permute_unet(_real_state(layout, state), spec, perms)
    return aligned, perms
