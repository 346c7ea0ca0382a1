"""M PlainConvUNets of one ArchSpec as ONE network of grouped convolutions (no vmap).

    logits = grouped_forward(template, params, x)    x [M, B, C, H, W] -> logits [M, B, K, H, W]

`params` are the M runs' parameters stacked, {name: [M, *shape]}, named as in the template network's
`named_parameters()`. Inside, activations are laid out [B, M·C, H, W] (run m owns channels
m·C .. m·C+C-1), so every layer is one call:

  conv 3x3 / 1x1         F.conv2d(groups=M) with weights [M·O, C, k, k]
  transposed conv        F.conv_transpose2d(groups=M) with weights [M·C, O, s, s]
  InstanceNorm (affine)  F.instance_norm: statistics are per (sample, channel) anyway, so the
                         M runs' channels are just more channels
  LeakyReLU / ReLU       elementwise
  skip concatenation     per run: [B, M, C1, H, W] ++ [B, M, C2, H, W] along C

This is the computation `torch.func.vmap(functional_call)` lowers to, written out so the layout is
ours: on the CPU channels-last grouped convolutions run their backward pass much faster than the
layout vmap produces (docs/benchmarks.md, "Zoo build profile"). Equal to M separate networks up to
float rounding (tests/test_grouped.py). Supported: what `weightzoo.nets.unet` builds without dropout
(2-D, instance norm, no deep supervision); anything else is refused in one line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weightzoo.errors import InputError


def _refuse(what: str) -> InputError:
    return InputError(f"the grouped trainer cannot run {what}", "train these runs sequentially")


def _block(
    block: nn.Module, prefix: str, p: dict[str, torch.Tensor], h: torch.Tensor, m: int
) -> torch.Tensor:
    """One ConvDropoutNormReLU (`block` from the template) on h [B, M·C, H, W]."""
    conv = block.conv
    if getattr(block, "dropout", None) is not None:
        raise _refuse("dropout")
    if not isinstance(conv, nn.Conv2d):
        raise _refuse(f"{type(conv).__name__} layers")
    w = p[f"{prefix}.conv.weight"]  # [M, O, C, k, k]
    b = p.get(f"{prefix}.conv.bias")
    h = F.conv2d(
        h,
        w.reshape(-1, *w.shape[2:]),
        None if b is None else b.reshape(-1),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=m,
    ).contiguous()  # a channels-last input (see grouped_forward) gives a channels-last output
    norm = getattr(block, "norm", None)
    if norm is not None:
        if not isinstance(norm, nn.InstanceNorm2d) or not norm.affine:
            raise _refuse(f"{type(norm).__name__} normalisation")
        # group norm with one channel per group = instance norm; unlike F.instance_norm it keeps a
        # channels-last layout (no copy in and out)
        h = F.group_norm(
            h,
            h.shape[1],
            p[f"{prefix}.norm.weight"].reshape(-1),
            p[f"{prefix}.norm.bias"].reshape(-1),
            norm.eps,
        )
    act = getattr(block, "nonlin", None)
    if isinstance(act, nn.LeakyReLU):
        h = F.leaky_relu(h, act.negative_slope)
    elif isinstance(act, nn.ReLU):
        h = F.relu(h)
    elif act is not None:
        raise _refuse(f"{type(act).__name__} activations")
    return h


def _stacked(
    blocks: nn.Module, prefix: str, p: dict[str, torch.Tensor], h: torch.Tensor, m: int
) -> torch.Tensor:
    """A StackedConvBlocks (`.convs`, a Sequential of ConvDropoutNormReLU)."""
    for i, block in enumerate(blocks.convs):
        h = _block(block, f"{prefix}.convs.{i}", p, h, m)
    return h


def grouped_forward(
    template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, channels_last: bool = True
) -> torch.Tensor:
    """M networks shaped like `template` (a PlainConvUNet) on x [M, B, C, H, W] -> [M, B, K, H, W]."""
    enc, dec = template.encoder, template.decoder
    if getattr(enc, "stem", None) is not None or dec.deep_supervision or x.ndim != 5:
        raise _refuse("this network (stem, deep supervision or 3-D input)")
    m, b, p = x.shape[0], x.shape[1], params
    h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])  # [B, M·C, H, W]
    skips = []
    for s, stage in enumerate(enc.stages):
        for j, blocks in enumerate(stage):
            h = _stacked(blocks, f"encoder.stages.{s}.{j}", p, h, m)
        skips.append(h)
    low = skips[-1]
    for s, stage in enumerate(dec.stages):
        tc = dec.transpconvs[s]
        w = p[f"decoder.transpconvs.{s}.weight"]  # [M, C, O, s, s]
        bias = p.get(f"decoder.transpconvs.{s}.bias")
        up = F.conv_transpose2d(
            low,
            w.reshape(-1, *w.shape[2:]),
            None if bias is None else bias.reshape(-1),
            stride=tc.stride,
            groups=m,
        )
        skip = skips[-(s + 2)]
        cat = torch.cat([up.unflatten(1, (m, -1)), skip.unflatten(1, (m, -1))], 2).flatten(1, 2)
        if channels_last:
            cat = cat.contiguous(memory_format=torch.channels_last)
        low = _stacked(stage, f"decoder.stages.{s}", p, cat, m)
    last = len(dec.stages) - 1
    w, bias = p[f"decoder.seg_layers.{last}.weight"], p[f"decoder.seg_layers.{last}.bias"]
    out = F.conv2d(low, w.reshape(-1, *w.shape[2:]), bias.reshape(-1), groups=m)  # [B, M·K, H, W]
    return out.unflatten(1, (m, -1)).transpose(0, 1)
