"""A U-Net as a pure function of its parameters: nnU-Net's PlainConvUNet (2-D), and the scale-space
variant whose levels resize by a continuous factor φ instead of 2.

Why a functional copy: a hypernetwork produces the weights, possibly a different set per sample, so
the network must run on weights it is handed (`params[name]`, [*shape] or, per sample, [B, *shape]).

Two modes, one parameter layout (names are PlainConvUNet's, so a sampled `plain` network loads into
nnU-Net's class unchanged and `unet_forward(real_state_dict(net), x) == net(x)`):
  plain  encoder stage s: conv(stride s) → IN → LeakyReLU, (n_conv-1) more; decoder level t:
         transposed conv (kernel = stride) → concat skip → convs; 1x1 seg layer on the last level.
  scale  (SSHN, Ortiz et al. 2023) stage s ≥ 1 first resizes its input by φ (bilinear) and every conv
         has stride 1; decoder level t: 1x1 conv (instead of the transposed conv) at the coarse size,
         then bilinear resize to the skip's size. φ = 0.5 ≈ nnU-Net's stride 2. Any input size works;
         a level is never smaller than 2 x 2 (e.g. small preset, 64 px, φ = 0.25: 64, 16, 4, 2).

Per-sample weights use grouped convolutions: x [B, C, H, W] → [1, B·C, H, W], weights
[B, O, C, k, k] → [B·O, C, k, k], groups = B; instance norm is per sample already.
FLOPs (`unet_flops`) count every convolution and transposed convolution (2 per multiply-add, output
positions including the padded border), as torch's FlopCounterMode does; resizing is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightzoo.errors import ModelError

Params = Mapping[str, torch.Tensor]
MODES = ("plain", "scale")
PHI_RANGE = (0.2, 0.8)
MIN_LEVEL = 2  # smallest side of a scale-space level  # scales a scale-space network accepts (the hypernetwork trains on [0.25, 0.75])


def _stage_layout(kw: dict[str, Any]) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """features, kernel (square), stride (square), encoder convs, decoder convs, as int lists."""

    def sq(v: Any, what: str) -> int:
        vals = v if isinstance(v, list) else [v]
        if len(set(vals)) != 1:
            raise ModelError(f"{what} {v} is not square", "the functional U-Net takes square 2-D kernels")
        return int(vals[0])

    return (
        list(kw["features_per_stage"]),
        [sq(k, "kernel") for k in kw["kernel_sizes"]],
        [sq(s, "stride") for s in kw["strides"]],
        list(kw["n_conv_per_stage"]),
        list(kw["n_conv_per_stage_decoder"]),
    )


def check_functional(kw: dict[str, Any]) -> None:
    """A ModelError unless the functional U-Net can run this PlainConvUNet block (2-D, IN, no dropout)."""
    if "3d" in str(kw.get("conv_op", "")).lower():
        raise ModelError("the hypernetwork U-Net is 2-D only", "use a 2-D preset (tiny, small, default)")
    if "InstanceNorm" not in str(kw.get("norm_op")) or not (kw.get("norm_op_kwargs") or {}).get("affine"):
        raise ModelError("the hypernetwork U-Net needs affine instance norm", "use a weightzoo preset")
    if kw.get("dropout_op"):
        raise ModelError("the hypernetwork U-Net has no dropout", "train without --dropout")
    _stage_layout(kw)


def param_shapes(
    kw: dict[str, Any], in_ch: int, n_cls: int, mode: str = "plain"
) -> dict[str, tuple[int, ...]]:
    """name -> shape of every parameter the forward uses, in PlainConvUNet's naming (the contract a
    hypernetwork generates against). `scale` renames the transposed convs to 1x1 `upconvs`."""
    if mode not in MODES:
        raise ModelError(f"unknown U-Net mode {mode!r}", f"use one of {MODES}")
    feats, kern, stride, nconv, nconv_dec = _stage_layout(kw)
    bias = bool(kw.get("conv_bias", True))
    out: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, cin: int, cout: int, k: int) -> None:
        out[f"{prefix}.conv.weight"] = (cout, cin, k, k)
        if bias:
            out[f"{prefix}.conv.bias"] = (cout,)
        out[f"{prefix}.norm.weight"] = (cout,)
        out[f"{prefix}.norm.bias"] = (cout,)

    cin = in_ch
    for s, f in enumerate(feats):
        for j in range(nconv[s]):
            block(f"encoder.stages.{s}.0.convs.{j}", cin if j == 0 else f, f, kern[s])
        cin = f
    n = len(feats)
    for t in range(n - 1):
        below, skip = feats[n - 1 - t], feats[n - 2 - t]
        if mode == "plain":
            st = stride[n - 1 - t]
            out[f"decoder.transpconvs.{t}.weight"] = (below, skip, st, st)
            if bias:
                out[f"decoder.transpconvs.{t}.bias"] = (skip,)
        else:
            out[f"decoder.upconvs.{t}.weight"] = (skip, below, 1, 1)
            if bias:
                out[f"decoder.upconvs.{t}.bias"] = (skip,)
        for j in range(nconv_dec[t]):
            block(f"decoder.stages.{t}.convs.{j}", 2 * skip if j == 0 else skip, skip, kern[n - 2 - t])
    out[f"decoder.seg_layers.{n - 2}.weight"] = (n_cls, feats[0], 1, 1)
    out[f"decoder.seg_layers.{n - 2}.bias"] = (n_cls,)
    return out


def level_sizes(size: tuple[int, int], n_stages: int, mode: str, strides: list[int], phi: float) -> list:
    """Spatial size of each encoder stage's output for an input of `size`."""
    sizes = [tuple(size)]
    for s in range(1, n_stages):
        h, w = sizes[-1]
        if mode == "plain":  # conv with padding (k-1)//2 and stride st: ceil(d / st)
            sizes.append((math.ceil(h / strides[s]), math.ceil(w / strides[s])))
        else:
            # never below 2 x 2: instance norm needs more than one value per channel
            sizes.append(
                (max(MIN_LEVEL, math.floor(h * phi + 0.5)), max(MIN_LEVEL, math.floor(w * phi + 0.5)))
            )
    return sizes


# ---- per-sample-capable ops --------------------------------------------------------------------------
def _conv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    stride: int,
    batched: bool,
    transposed: bool = False,
) -> torch.Tensor:
    """A 2-D convolution ('same' padding for odd kernels; transposed: kernel = stride, no padding),
    with one weight set per sample when `batched` (grouped over the batch)."""
    op = F.conv_transpose2d if transposed else F.conv2d
    pad = 0 if transposed else (w.shape[-1] - 1) // 2
    if not batched:
        return op(x, w, b, stride, pad)
    B, C = x.shape[:2]  # [B, C, H, W] -> [1, B·C, H, W]; weights [B, O, C, k, k] -> [B·O, C, k, k]
    bias = None if b is None else b.flatten()
    y = op(x.reshape(1, B * C, *x.shape[2:]), w.flatten(0, 1), bias, stride, pad, groups=B)
    return y.reshape(B, -1, *y.shape[2:])


def _norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, batched: bool) -> torch.Tensor:
    if not batched:
        return F.instance_norm(x, weight=w, bias=b, eps=eps)
    # [B, C] channels of one "sample": the statistics are per (b, c) either way, and the affine fuses
    B, C = x.shape[:2]
    return F.instance_norm(
        x.reshape(1, B * C, *x.shape[2:]), weight=w.flatten(), bias=b.flatten(), eps=eps
    ).reshape(x.shape)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return (
        x
        if tuple(x.shape[-2:]) == tuple(size)
        else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    )


def unet_forward(
    params: Params,
    x: torch.Tensor,
    kw: dict[str, Any],
    mode: str = "plain",
    phi: float = 0.5,
    batched: bool = False,
) -> torch.Tensor:
    """x [B, C, H, W] -> logits [B, K, H, W] with the given weights (per sample if `batched`:
    every tensor [B, *shape]). In plain mode H and W must be multiples of the strides' product."""
    feats, _, stride, nconv, nconv_dec = _stage_layout(kw)
    eps = float((kw.get("norm_op_kwargs") or {}).get("eps", 1e-5))
    slope = (
        float((kw.get("nonlin_kwargs") or {}).get("negative_slope", 0.01))
        if "Leaky" in str(kw.get("nonlin"))
        else 0.0
    )
    n = len(feats)
    sizes = level_sizes(tuple(x.shape[-2:]), n, mode, stride, phi)

    def blocks(prefix: str, x: torch.Tensor, count: int, first_stride: int) -> torch.Tensor:
        for j in range(count):
            p = f"{prefix}.convs.{j}"
            x = _conv(
                x,
                params[f"{p}.conv.weight"],
                params.get(f"{p}.conv.bias"),
                first_stride if j == 0 else 1,
                batched,
            )
            x = F.leaky_relu(
                _norm(x, params[f"{p}.norm.weight"], params[f"{p}.norm.bias"], eps, batched), slope
            )
        return x

    skips = []
    for s in range(n):  # x: [B, F_s, *sizes[s]]
        if mode == "scale" and s > 0:
            x = _resize(x, sizes[s])
        x = blocks(f"encoder.stages.{s}.0", x, nconv[s], stride[s] if mode == "plain" else 1)
        skips.append(x)
    x = skips[-1]
    for t in range(n - 1):  # x: [B, F_{n-1-t}, ...] -> [B, F_{n-2-t}, *sizes[n-2-t]]
        skip = skips[n - 2 - t]
        if mode == "plain":
            p = f"decoder.transpconvs.{t}"
            x = _conv(x, params[f"{p}.weight"], params.get(f"{p}.bias"), stride[n - 1 - t], batched, True)
        else:
            p = f"decoder.upconvs.{t}"
            x = _resize(_conv(x, params[f"{p}.weight"], params.get(f"{p}.bias"), 1, batched), skip.shape[-2:])
        x = blocks(f"decoder.stages.{t}", torch.cat([x, skip], 1), nconv_dec[t], 1)
    p = f"decoder.seg_layers.{n - 2}"
    return _conv(x, params[f"{p}.weight"], params[f"{p}.bias"], 1, batched)


def unet_flops(
    kw: dict[str, Any], in_ch: int, n_cls: int, size: tuple[int, int], mode: str = "plain", phi: float = 0.5
) -> int:
    """Exact convolution FLOPs (2 per multiply-add) of one forward on one [in_ch, *size] image."""
    stride = _stage_layout(kw)[2]
    n = len(kw["features_per_stage"])
    sizes = level_sizes(tuple(size), n, mode, stride, phi)
    shapes = param_shapes(kw, in_ch, n_cls, mode)
    total = 0

    def at(hw: tuple[int, int]) -> int:
        return hw[0] * hw[1]

    for name, shape in shapes.items():
        if not name.endswith("weight") or len(shape) != 4:
            continue
        macs_per_pos = shape[0] * shape[1] * shape[2] * shape[3]
        parts = name.split(".")
        if parts[0] == "encoder":
            pos = at(sizes[int(parts[2])])
        elif parts[1] == "transpconvs" or parts[1] == "upconvs":  # each input position scatters a full kernel
            pos = at(sizes[n - 1 - int(parts[2])])
        elif parts[1] == "stages":
            pos = at(sizes[n - 2 - int(parts[2])])
        else:  # seg layer
            pos = at(sizes[0])
        total += 2 * macs_per_pos * pos
    return total


def he_init(shapes: dict[str, tuple[int, ...]], seed: int | None = None) -> dict[str, torch.Tensor]:
    """nnU-Net's initialisation (InitWeights_He(1e-2): kaiming normal on conv weights, zero biases;
    norms at weight 1, bias 0) for a parameter layout."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        elif name.endswith("weight"):
            fan_in = shape[1] * shape[2] * shape[3]  # torch's rule, also for transposed convs
            std = math.sqrt(2.0 / (1 + 0.01**2)) / math.sqrt(fan_in)
            out[name] = torch.randn(shape, generator=g) * std
        else:
            out[name] = torch.zeros(shape)
    return out


class ScaleSpaceUNet(nn.Module):
    """A U-Net whose levels resize by a fixed φ (`arch_kwargs["scale"]`), with its own parameters.

    It is what `weightzoo hyper sample --scale φ` writes and what fixed-φ baselines train. The state
    dict names are `params.<PlainConvUNet name with '.' → '__'>`.
    """

    def __init__(
        self, input_channels: int, num_classes: int, arch_kwargs: dict[str, Any], seed: int | None = None
    ):
        super().__init__()
        self.kw = {k: v for k, v in arch_kwargs.items() if k != "scale"}
        self.phi = float(arch_kwargs["scale"])
        check_functional(self.kw)
        shapes = param_shapes(self.kw, input_channels, num_classes, "scale")
        init = he_init(shapes, seed)
        self.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v) for k, v in init.items()})

    def named_weights(self) -> dict[str, torch.Tensor]:
        return {k.replace("__", "."): v for k, v in self.params.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unet_forward(self.named_weights(), x, self.kw, "scale", self.phi)
