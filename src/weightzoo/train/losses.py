"""nnU-Net's loss for region-based (sigmoid) training: soft batch Dice + binary cross-entropy.

nnU-Net trains overlapping regions with `DC_and_BCE_loss(batch_dice=True, do_bg=True, smooth=1e-5)`:
Dice over sigmoid probabilities with intersections summed over the whole batch, plus BCE on the
logits, weighted 1:1. We use MONAI's `DiceLoss` and torch's `BCEWithLogitsLoss` for the two parts.
MONAI's `DiceCELoss` is NOT used: with more than one output channel it switches to softmax
cross-entropy, which is wrong for independent (possibly overlapping) binary tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # distributed imports this module lazily: no cycle at run time
    from weightzoo.train.distributed import DataParallel


class DiceBCELoss(nn.Module):
    """Soft Dice (batch Dice, every channel) + BCE, computed in fp32 even under autocast.

    forward(logits [B, K, H, W], target [B, K, H, W] in {0, 1}) -> scalar loss.
    `dice_and_bce` returns the two parts separately (for logging).
    """

    def __init__(
        self, batch_dice: bool = True, weight_dice: float = 1.0, weight_bce: float = 1.0, smooth: float = 1e-5
    ):
        super().__init__()
        from monai.losses import DiceLoss  # lazy: importing monai takes ~1.5 s, too long for every CLI call

        self.dice = DiceLoss(
            sigmoid=True, include_background=True, batch=batch_dice, smooth_nr=smooth, smooth_dr=smooth
        )
        self.bce = nn.BCEWithLogitsLoss()
        self.weight_dice, self.weight_bce = weight_dice, weight_bce

    def dice_and_bce(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        # bf16 sigmoid/log terms lose too much precision near 0 and 1: leave autocast for the loss.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            target = target.float()
            return self.dice(logits, target), self.bce(logits, target)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice, bce = self.dice_and_bce(logits, target)
        return self.weight_dice * dice + self.weight_bce * bce


@torch.no_grad()
def dice_counts(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-task [K, 3] counts (tp, fp, fn) of thresholded sigmoid predictions, summed over the batch.

    Summing counts over batches and then computing 2tp / (2tp + fp + fn) gives nnU-Net's
    "pseudo Dice" on the whole validation set.
    """
    pred = torch.sigmoid(logits.float()) >= threshold
    gt = target.bool()
    dims = [0, *range(2, logits.ndim)]
    tp = (pred & gt).sum(dims)
    fp = (pred & ~gt).sum(dims)
    fn = (~pred & gt).sum(dims)
    return torch.stack([tp, fp, fn], dim=1).to(torch.float64).cpu()


def dice_from_counts(counts: torch.Tensor) -> list[float]:
    """[K, 3] (tp, fp, fn) -> Dice per task; NaN (undefined, as in nnU-Net) where prediction and
    truth are both empty, e.g. a task whose foreground the validation subjects do not have."""
    tp, fp, fn = counts.unbind(1)
    denom = 2 * tp + fp + fn
    return [float("nan") if float(d) == 0 else float(2 * t / d) for t, d in zip(tp, denom, strict=True)]


class GlobalBatchDiceBCE(nn.Module):
    """`DiceBCELoss` over the global batch of a synchronous data-parallel step, from this rank's rows.

    Batch Dice sums intersections over the whole batch, so the Dice of N shards is not the mean of
    their Dice: each rank all-reduces its per-task sums (intersection, truth, prediction) and BCE sum,
    and treats the other ranks' parts as constants. The returned value is the global loss; its
    gradient is scaled so that DDP's mean over ranks gives the global loss's gradient exactly:
    N·∂Dice/∂(own sums) (every rank holds 1/N of the Dice's inputs) + ∂(own BCE mean).
    Formula as MONAI's DiceLoss(sigmoid, batch=True, include_background=True), mean over tasks.
    """

    def __init__(self, base: DiceBCELoss, dp: DataParallel):
        super().__init__()
        self.base, self.dp = base, dp

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        n = self.dp.world_size
        smooth_nr, smooth_dr = self.base.dice.smooth_nr, self.base.dice.smooth_dr
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = logits.float(), target.float()
            prob = torch.sigmoid(logits)
            dims = [0, *range(2, logits.ndim)]
            own = torch.stack([(prob * target).sum(dims), target.sum(dims), prob.sum(dims)])  # [3, K]
            bce_sum = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
            packed = torch.cat([own.detach().reshape(-1), bce_sum.detach().reshape(1)])
            total = self.dp.all_reduce_sum(packed.clone(), "loss")
            glob = own + (total[:-1].reshape(own.shape) - own).detach()  # others' sums: constants
            inter, truth, pred = glob
            dice = (1 - (2 * inter + smooth_nr) / (truth + pred + smooth_dr)).mean()
            bce_own = bce_sum / logits.numel()
            bce_global = total[-1] / (logits.numel() * n)
            dice_term = dice.detach() + n * (dice - dice.detach())
            bce_term = bce_global + (bce_own - bce_own.detach())
            return self.base.weight_dice * dice_term + self.base.weight_bce * bce_term
