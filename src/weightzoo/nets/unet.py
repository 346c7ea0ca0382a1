"""nnU-Net's PlainConvUNet, built only through a JSON-able ArchSpec.

An ArchSpec is exactly what nnU-Net v2 stores in `plans.json` under
`configurations.<cfg>.architecture` (`network_class_name`, `arch_kwargs`, `_kw_requires_import`),
plus the input and output channel counts, which nnU-Net derives from `dataset.json`. Keeping the
same shape means our checkpoints load into nnU-Net and nnU-Net's into us. Two checkpoints are
comparable only if their `ArchSpec.hash()` match.

Ops are named by their import path, as in nnU-Net plans, but resolved through an explicit
allow-list: a spec read from disk never imports arbitrary code.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightzoo.errors import ModelError, UnknownNameError

PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
# weightzoo's own U-Net whose levels resize by a continuous factor (arch_kwargs["scale"]); 2-D, no
# nnU-Net export. See weightzoo.nets.functional_unet.
SCALE_SPACE_UNET = "weightzoo.nets.functional_unet.ScaleSpaceUNet"
NETWORK_CLASSES = (PLAIN_CONV_UNET, SCALE_SPACE_UNET)

# import path (as written in nnU-Net plans) -> class. The only ops a spec may name.
ALLOWED_OPS: dict[str, type[nn.Module]] = {
    "torch.nn.modules.conv.Conv2d": nn.Conv2d,
    "torch.nn.modules.conv.Conv3d": nn.Conv3d,
    "torch.nn.modules.instancenorm.InstanceNorm2d": nn.InstanceNorm2d,
    "torch.nn.modules.instancenorm.InstanceNorm3d": nn.InstanceNorm3d,
    "torch.nn.modules.batchnorm.BatchNorm2d": nn.BatchNorm2d,
    "torch.nn.modules.batchnorm.BatchNorm3d": nn.BatchNorm3d,
    "torch.nn.modules.dropout.Dropout2d": nn.Dropout2d,
    "torch.nn.modules.dropout.Dropout3d": nn.Dropout3d,
    "torch.nn.modules.activation.LeakyReLU": nn.LeakyReLU,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.LeakyReLU": nn.LeakyReLU,
    "torch.nn.ReLU": nn.ReLU,
}
OP_KEYS = ("conv_op", "norm_op", "dropout_op", "nonlin")


def _unet_kwargs(
    features: list[int],
    n_conv: int,
    dropout: float,
    conv_bias: bool = True,
    kernels: list[list[int]] | None = None,
    strides: list[list[int]] | None = None,
) -> dict[str, Any]:
    """PlainConvUNet arch_kwargs; 2-D 3x3 kernels and stride-2 stages unless `kernels`/`strides`
    (one [k per axis] per stage) are given, whose length per stage sets the dimension (3 -> Conv3d)."""
    n = len(features)
    dims = len(kernels[0]) if kernels else 2
    op = f"{dims}d"
    return {
        "n_stages": n,
        "features_per_stage": features,
        "conv_op": f"torch.nn.modules.conv.Conv{op}",
        "kernel_sizes": kernels if kernels else [[3, 3]] * n,
        "strides": strides if strides else [[1, 1]] + [[2, 2]] * (n - 1),
        "n_conv_per_stage": [n_conv] * n,
        "n_conv_per_stage_decoder": [n_conv] * (n - 1),
        "conv_bias": conv_bias,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{op}",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": f"torch.nn.modules.dropout.Dropout{op}" if dropout > 0 else None,
        "dropout_op_kwargs": {"p": dropout, "inplace": False} if dropout > 0 else None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def plan_3d_stages(
    n_stages: int, patch: Sequence[int], spacing: Sequence[float]
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides per stage for a 3-D patch at `spacing`, by nnU-Net's rules
    (`get_pool_and_conv_props`, simplified): an axis is downsampled only while its spacing is within
    2x of the finest axis and it keeps >= 4 voxels, and its kernel is 1 (not 3) while its spacing is
    more than 2x the finest. So a 3 mm x 0.8 mm x 0.8 mm patch first convolves in-plane only, and
    pools z only once the in-plane spacing has caught up."""
    current = [float(s) for s in spacing]
    size = [int(p) for p in patch]
    kernels, strides = [], []
    for stage in range(n_stages):
        finest = min(current)
        # a stage's first conv strides, so its kernels work at the spacing after that stride
        stride = [
            2 if stage and c <= 2 * finest and sz // 2 >= 4 and sz % 2 == 0 else 1
            for c, sz in zip(current, size, strict=True)
        ]
        current = [c * s for c, s in zip(current, stride, strict=True)]
        size = [sz // s for sz, s in zip(size, stride, strict=True)]
        strides.append(stride)
        kernels.append([3 if c <= 2 * min(current) else 1 for c in current])
    return kernels, strides


# name -> (features per stage, convs per stage[, conv bias]). Patch size must be divisible by
# 2**(stages-1).
PRESETS: dict[str, tuple] = {
    # G.pt scale (~3.7 k params) for zoos of thousands of runs. Without conv biases: every conv is
    # followed by an instance norm, which subtracts them again, so they would be weight-space
    # directions that change nothing (dead dimensions for a weight generator).
    "micro": ([4, 8, 16], 1, False),
    "tiny": ([4, 8, 16], 1),  # ~4 k params: tests
    "small": ([16, 32, 64, 128], 2),  # ~0.5 M params: CPU demo, zoo scale
    "default": ([32, 64, 128, 256, 512], 2),  # nnU-Net-2D-like, for a GPU
    # 3-D (Conv3d, InstanceNorm3d): kernels and strides are planned from the patch and spacing
    # (plan_3d_stages), as nnU-Net's 3d_fullres plans are.
    "tiny3d": ([4, 8, 16], 1),  # ~10 k params (isotropic 64^3): tests
    "small3d": ([8, 16, 32, 64], 2),  # ~0.35 M params: CPU training of small volumes
    "default3d": ([32, 64, 128, 256, 320], 2),  # ~16.5 M: nnU-Net-3d_fullres-like (capped at 320), GPU
}
PRESETS_3D = ("tiny3d", "small3d", "default3d")


@dataclass(frozen=True)
class ArchSpec:
    """What it takes to build a network: nnU-Net's architecture block + channel counts."""

    arch_kwargs: dict[str, Any]
    input_channels: int = 1
    num_classes: int = 1
    network_class_name: str = PLAIN_CONV_UNET
    _hash: str = field(default="", compare=False, repr=False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def preset(
        cls,
        name: str,
        input_channels: int = 1,
        num_classes: int = 1,
        dropout: float = 0.0,
        patch: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> ArchSpec:
        """A named preset (`micro`, `tiny`, `small`, `default`; 3-D: `tiny3d`, `small3d`,
        `default3d`); `dropout` > 0 adds spatial (channel) dropout. 3-D presets plan their kernels and
        strides from `patch` (default 64^3) and `spacing` (default isotropic), see plan_3d_stages."""
        if name not in PRESETS:
            raise UnknownNameError("preset", name, list(PRESETS))
        features, n_conv, *bias = PRESETS[name]
        if name not in PRESETS_3D:
            return cls(_unet_kwargs(features, n_conv, dropout, *bias), input_channels, num_classes)
        kernels, strides = plan_3d_stages(len(features), patch or (64, 64, 64), spacing or (1.0, 1.0, 1.0))
        return cls(
            _unet_kwargs(features, n_conv, dropout, kernels=kernels, strides=strides),
            input_channels,
            num_classes,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> ArchSpec:
        """From a file's dict (`source`, named in errors): every arch_kwarg checked (types, ranges,
        sizes) before anything is built."""
        try:
            spec = cls(
                arch_kwargs=copy.deepcopy(d["arch_kwargs"]),
                input_channels=int(d["input_channels"]),
                num_classes=int(d["num_classes"]),
                network_class_name=d.get("network_class_name", PLAIN_CONV_UNET),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(
                f"not a valid ArchSpec ({e!r})", "re-create the model with weightzoo", source
            ) from None
        check_arch_kwargs(
            spec.arch_kwargs, spec.input_channels, spec.num_classes, source, spec.network_class_name
        )
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "network_class_name": self.network_class_name,
            "arch_kwargs": copy.deepcopy(self.arch_kwargs),
            "input_channels": self.input_channels,
            "num_classes": self.num_classes,
        }

    def to_nnunet_architecture(self) -> dict[str, Any]:
        """The `architecture` block of an nnU-Net v2 plans configuration."""
        return {
            "network_class_name": self.network_class_name,
            "arch_kwargs": copy.deepcopy(self.arch_kwargs),
            "_kw_requires_import": list(OP_KEYS),
        }

    def hash(self) -> str:
        """Short stable hash of everything that changes parameter shapes or the function."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def n_stages(self) -> int:
        return int(self.arch_kwargs["n_stages"])

    @property
    def dims(self) -> int:
        """2 or 3: the spatial dimension of the convolutions."""
        return 3 if "3d" in str(self.arch_kwargs.get("conv_op", "")).lower() else 2

    @property
    def size_divisors(self) -> tuple[int, ...]:
        """Per spatial axis, the multiple every input size along it must be (product of strides)."""
        if self.network_class_name == SCALE_SPACE_UNET:
            return (1,) * self.dims
        out = [1] * self.dims
        for s in self.arch_kwargs["strides"]:
            for a in range(self.dims):
                out[a] *= int(s[a] if isinstance(s, (list, tuple)) else s)
        return tuple(out)

    @property
    def size_divisor(self) -> int:
        """Input H and W must be multiples of this (product of the strides; 1 for a scale-space net)."""
        if self.network_class_name == SCALE_SPACE_UNET:
            return 1
        d = 1
        for s in self.arch_kwargs["strides"]:
            d *= int(s[0] if isinstance(s, (list, tuple)) else s)
        return d

    def with_classes(self, num_classes: int) -> ArchSpec:
        return ArchSpec(
            copy.deepcopy(self.arch_kwargs), self.input_channels, num_classes, self.network_class_name
        )


MAX_STAGES, MAX_FEATURES, MAX_CONVS, MAX_KERNEL, MAX_IO = 10, 4096, 8, 15, 256
ARCH_KEYS = set(_unet_kwargs([1], 1, 0.5)) | {"deep_supervision"}
SCALE_KEY = "scale"  # a scale-space U-Net's resize factor φ


def check_arch_kwargs(
    kw: Any,
    input_channels: int = 1,
    num_classes: int = 1,
    source: str | Path | None = None,
    network_class: str = PLAIN_CONV_UNET,
) -> None:
    """A one-line ModelError (naming `source`) unless `kw` is a PlainConvUNet block we can build
    within the caps."""

    def bad(what: str) -> ModelError:
        return ModelError(f"arch_kwargs: {what}", "fix the architecture block of the file", source)

    def ints(v: Any, n: int | None, lo: int, hi: int, name: str) -> list[int]:
        if not isinstance(v, list) or (n is not None and len(v) != n):
            raise bad(f"{name} must be a list of {n if n is not None else 'n'} integers, got {v!r:.60}")
        if not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v):
            raise bad(f"{name} values must be integers in [{lo}, {hi}], got {v!r:.60}")
        return v

    if not isinstance(kw, dict):
        raise bad(f"must be a mapping, got {type(kw).__name__}")
    unknown = sorted(set(kw) - ARCH_KEYS - ({SCALE_KEY} if network_class == SCALE_SPACE_UNET else set()))
    if unknown:
        raise bad(f"unknown key(s) {unknown}")
    if network_class not in NETWORK_CLASSES:
        raise bad(
            f"network class {str(network_class)[:80]!r} is not one weightzoo builds ({', '.join(NETWORK_CLASSES)})"
        )
    if network_class == SCALE_SPACE_UNET:
        from weightzoo.nets.functional_unet import PHI_RANGE

        phi = kw.get(SCALE_KEY)
        if (
            not isinstance(phi, (int, float))
            or isinstance(phi, bool)
            or not PHI_RANGE[0] <= phi <= PHI_RANGE[1]
        ):
            raise bad(f"scale must be a number in [{PHI_RANGE[0]}, {PHI_RANGE[1]}], got {phi!r:.40}")
    n = kw.get("n_stages")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_STAGES:
        raise bad(f"n_stages must be an integer in [1, {MAX_STAGES}], got {n!r}")
    ints(kw.get("features_per_stage"), n, 1, MAX_FEATURES, "features_per_stage")
    ints(kw.get("n_conv_per_stage"), n, 1, MAX_CONVS, "n_conv_per_stage")
    ints(kw.get("n_conv_per_stage_decoder"), n - 1, 1, MAX_CONVS, "n_conv_per_stage_decoder")
    dims = 3 if "3d" in str(kw.get("conv_op", "")).lower() else 2
    for key, lo in (("kernel_sizes", 1), ("strides", 1)):
        v = kw.get(key)
        if not isinstance(v, list) or len(v) != n:
            raise bad(f"{key} must have one entry per stage ({n}), got {v!r:.60}")
        for e in v:  # an int, or one int per spatial dimension of the conv
            ints(e if isinstance(e, list) else [e], dims if isinstance(e, list) else 1, lo, MAX_KERNEL, key)
    for key in OP_KEYS:
        if kw.get(key) is not None and not isinstance(kw.get(key), str):
            raise bad(f"{key} must be an op name (a string), got {type(kw.get(key)).__name__}")
    for key in ("norm_op_kwargs", "dropout_op_kwargs", "nonlin_kwargs"):
        if kw.get(key) is not None and not isinstance(kw.get(key), dict):
            raise bad(f"{key} must be a mapping or null")
    if not isinstance(kw.get("conv_bias", True), bool):
        raise bad("conv_bias must be true or false")
    if not (1 <= input_channels <= MAX_IO and 1 <= num_classes <= MAX_IO):
        raise bad(f"input_channels and num_classes must be in [1, {MAX_IO}]")


def _resolve_ops(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(kwargs)
    for key in OP_KEYS:
        name = out.get(key)
        if name is None:
            continue
        if name not in ALLOWED_OPS:
            raise ModelError(
                f"ArchSpec names op {key}={name!r}, which is not on weightzoo's allow-list",
                f"use one of: {', '.join(sorted(ALLOWED_OPS))}",
            )
        out[key] = ALLOWED_OPS[name]
    return out


def build_network(spec: ArchSpec, seed: int | None = None) -> nn.Module:
    """Build (and He-initialise, as nnU-Net does) the network an ArchSpec describes.

    With `seed`, initialisation is deterministic and independent of the global RNG state.
    """
    if spec.network_class_name == SCALE_SPACE_UNET:
        from weightzoo.nets.functional_unet import ScaleSpaceUNet

        return ScaleSpaceUNet(spec.input_channels, spec.num_classes, spec.arch_kwargs, seed)
    if spec.network_class_name != PLAIN_CONV_UNET:
        raise ModelError(
            f"network class {spec.network_class_name!r} is not supported",
            f"weightzoo builds {', '.join(NETWORK_CLASSES)}",
        )
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError:  # pragma: no cover - depends on the install
        raise ModelError(
            "dynamic-network-architectures is not installed",
            'pip install "dynamic-network-architectures>=0.3.1,<0.4" (a weightzoo dependency; see README)',
        ) from None
    kwargs = _resolve_ops(spec.arch_kwargs)
    fork = torch.random.fork_rng(devices=[]) if seed is not None else _null()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        net = PlainConvUNet(
            spec.input_channels, num_classes=spec.num_classes, deep_supervision=False, **kwargs
        )
        net.apply(PlainConvUNet.initialize)
    return net


def require_plain_unet(spec: ArchSpec, what: str, source: str | Path | None = None) -> None:
    """A one-line ModelError unless `spec` is nnU-Net's PlainConvUNet (zoo, export, pruning, generation
    and bases work on its parameter layout; a scale-space network only segments and evaluates)."""
    if spec.network_class_name != PLAIN_CONV_UNET:
        raise ModelError(
            f"{what} works on nnU-Net PlainConvUNet models; this one is a {spec.network_class_name.rsplit('.', 1)[-1]}",
            "use it with segment and evaluate, or a PlainConvUNet model here",
            source,
        )


def require_2d(spec: ArchSpec, what: str, source: str | Path | None = None) -> None:
    """A one-line ModelError for a 3-D network in a route that is 2-D only (generation, soups of bases,
    pruning, hypernetworks, uncertainty sampling): train, segment, evaluate, zoo and heads take 3-D."""
    if spec.dims != 2:
        raise ModelError(
            f"{what} works on 2-D networks; this one is 3-D",
            "use train, segment, evaluate, the zoo or site heads for 3-D models (docs/models.md)",
            source,
        )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def count_parameters(net: nn.Module) -> int:
    """Number of real parameters (named_parameters de-duplicates nnU-Net's aliased modules)."""
    return sum(p.numel() for p in net.parameters())


def real_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, each once (nnU-Net's state_dict lists aliased modules several times,
    e.g. `decoder.encoder.*` and `convs.0.all_modules.0` = `convs.0.conv`)."""
    out = dict(net.named_parameters())
    out.update(net.named_buffers())
    return out


def load_real_state_dict(net: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a `real_state_dict` (aliases share storage, so they follow)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    real = real_state_dict(net)
    lost = [k for k in missing if k in real]
    if lost or unexpected:
        raise ModelError(f"state does not fit the network (missing {lost[:2]}, unexpected {unexpected[:2]})")
    return net


def check_state_dict(
    spec: ArchSpec, state: dict[str, torch.Tensor], source: str = "checkpoint", spec_from: str | None = None
) -> None:
    """Raise a one-line ModelError if `state` does not fit the network `spec` builds, or has NaN/inf.

    `state` may be a full nnU-Net state_dict (aliases included) or a `real_state_dict`. `spec_from`
    names the file the architecture came from (e.g. model.json), so a mismatch names both files."""
    net = build_network(spec)
    full = net.state_dict()
    ref = real_state_dict(net)
    state = {k: v for k, v in state.items() if k in ref or k not in full}
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    wrong = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:2]}"
            if missing
            else f"unexpected {unexpected[:2]}"
            if unexpected
            else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(ref[wrong[0]].shape)}"
        )
        arch = f"the architecture in {spec_from}" if spec_from else "the model's architecture"
        raise ModelError(
            f"weights do not match {arch} ({detail})",
            "the checkpoint belongs to another architecture; use the model folder it was saved with",
            source,
        )
    not_float = [k for k in ref if not state[k].is_floating_point()]
    if not_float:
        k = not_float[0]
        raise ModelError(
            f"weights of the wrong dtype ({k} is {str(state[k].dtype).removeprefix('torch.')}, the network's is "
            f"{str(ref[k].dtype).removeprefix('torch.')})",
            "store weights as float32/float16/bfloat16; the file was not written by a network",
            source,
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(
            f"weights contain NaN or inf (first: {bad[0]})", "retrain or use an earlier checkpoint", source
        )
