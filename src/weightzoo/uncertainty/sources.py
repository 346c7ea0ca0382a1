"""Where the T probability samples come from. One interface: `source.samples(images) -> [T, N, K, H, W]`
for preprocessed images [N, C, H, W] (as `Segmenter.predict_batch` takes them).

  mc:T    Monte-Carlo spatial dropout: the network's own nnU-Net `dropout_op` (Dropout2d: whole channels)
          kept on at inference, T passes, pass t seeded with (seed, t): reproducible.
  tta:T   test-time augmentation by the T first of the 8 flips / 90° rotations of the square, each
          inverted exactly on the output (no interpolation: the inverse is a permutation of pixels).
  zoo:K   an ensemble: the K zoo runs of the task at the site with the best val Dice (a deep ensemble
          for free), or any list of Segmenters.
  ic:K    in-context candidates (Tyche-style): the shipped in-context model's K candidates for a query,
          given a labelled support set (no training); with tta, candidates also differ by support
          augmentation (Tyche's in-context TTA).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from weightzoo.errors import InputError, ModelError


def _batch_probs(seg: Any, images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(seg.predict_batch(images), dtype=np.float32))


class MCDropout:
    """T stochastic passes with the network's dropout layers on (and everything else in eval mode)."""

    name = "mc"

    def __init__(self, seg: Any, t: int, seed: int = 0):
        drops = [
            m for m in seg.net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
        ]
        if not drops:
            raise ModelError(
                f"model {seg.name} has no dropout layers, so MC dropout has nothing to sample",
                "train it with --dropout 0.1, or use --uncertainty tta:8",
            )
        self.seg, self.t, self.seed, self.dropouts = seg, t, seed, drops

    def samples(self, images: np.ndarray) -> torch.Tensor:
        out = []
        try:
            for m in self.dropouts:
                m.train()
            for t in range(self.t):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed * 100_003 + t)
                    out.append(_batch_probs(self.seg, images))
        finally:
            for m in self.dropouts:
                m.eval()
        return torch.stack(out)


# the dihedral group of the square: (flip W first?, number of 90° rotations)
DIHEDRAL = ((False, 0), (True, 0), (False, 2), (True, 2), (False, 1), (True, 1), (False, 3), (True, 3))


def dihedral(x: torch.Tensor, i: int, inverse: bool = False) -> torch.Tensor:
    """Transform i of the dihedral group on the last two dims [..., H, W]; `inverse` undoes it."""
    flip, k = DIHEDRAL[i]
    if not inverse:
        x = x.flip(-1) if flip else x
        return torch.rot90(x, k, (-2, -1))
    x = torch.rot90(x, -k, (-2, -1))
    return x.flip(-1) if flip else x


class TTA:
    """Test-time augmentation over the first T (≤ 8) flips/rotations, inverted exactly."""

    name = "tta"

    def __init__(self, seg: Any, t: int):
        if not 1 <= t <= len(DIHEDRAL):
            raise InputError(f"tta:{t} asks for {t} transforms", f"give tta:1 to tta:{len(DIHEDRAL)}")
        self.seg, self.t = seg, t

    def samples(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
        k = sum(1 for i in range(self.t) if DIHEDRAL[i][1] % 2)
        if k and x.shape[-1] != x.shape[-2]:
            raise InputError("90° rotations need square slices", "use tta:2 or tta:4 (flips and 180° only)")
        return torch.stack(
            [
                dihedral(_batch_probs(self.seg, dihedral(x, i).contiguous().numpy()), i, inverse=True)
                for i in range(self.t)
            ]
        )


class Ensemble:
    """One sample per member Segmenter (same tasks and preprocessing)."""

    name = "zoo"

    def __init__(self, members: Sequence[Any]):
        if not members:
            raise InputError(
                "an ensemble needs at least one member", "check the zoo holds runs of the task and site"
            )
        self.members = list(members)

    def samples(self, images: np.ndarray) -> torch.Tensor:
        return torch.stack([_batch_probs(m, images) for m in self.members])


class InContextCandidates:
    """K in-context candidates per image, for one task defined by a support set (Python API)."""

    name = "ic"

    def __init__(
        self, support_images: Any, support_labels: Any, k: int, tta: int = 0, seed: int = 0, model: Any = None
    ):
        from weightzoo.incontext import load_model

        self.support_images, self.support_labels = support_images, support_labels
        self.t, self.tta, self.seed = k, tta, seed
        self.model = load_model(model, "cpu")

    def samples(self, images: np.ndarray) -> torch.Tensor:
        from weightzoo.incontext import segment_batch

        x = np.asarray(images, dtype=np.float32)
        if x.shape[1] != 1:
            x = x.mean(1, keepdims=True)  # the in-context model reads gray images
        probs = segment_batch(
            list(x[:, 0]), self.support_images, self.support_labels, candidates=self.t, tta=self.tta,
            model=self.model, seed=self.seed, device="cpu",
        )  # fmt: skip
        return torch.from_numpy(np.stack(probs)).transpose(0, 1)[:, :, None]  # [K, N, 1, H, W]


def zoo_ensemble(zoo_path: Any, task: str, site: str, k: int, prep: Any) -> Ensemble:
    """The K runs of `task` at `site` whose final checkpoints have the best val Dice (train split)."""
    from weightzoo.generate.evaluate import zoo_segmenter
    from weightzoo.zoo.store import Zoo

    zoo = Zoo(zoo_path)
    finals: dict[str, Any] = {}
    for c in zoo.checkpoints(task=task, site=site, split="train"):
        if (
            c.tasks == [task]
            and c.sites == [site]
            and (c.run_id not in finals or c.step > finals[c.run_id].step)
        ):
            finals[c.run_id] = c
    ranked = sorted(finals.values(), key=lambda c: -(c.metrics.get(task, {}).get("val_dice") or -1.0))
    if len(ranked) < k:
        raise InputError(
            f"zoo:{k} asks for {k} runs of {task} at site {site}; the zoo has {len(ranked)}",
            f"give zoo:{len(ranked)} or fewer, or build more seeds",
            zoo_path,
        )
    return Ensemble([zoo_segmenter(zoo, c, prep) for c in ranked[:k]])


def parse_source(spec: str) -> tuple[str, int]:
    """'mc:20' -> ('mc', 20); a one-line error otherwise."""
    m = re.fullmatch(r"(mc|tta|zoo):(\d+)", spec.strip())
    if not m or int(m.group(2)) < 1:
        raise InputError(f"--uncertainty '{spec}' is not SOURCE:N", "use mc:20, tta:8 or zoo:5")
    return m.group(1), int(m.group(2))


def make_source(
    spec: str, seg: Any, seed: int = 0, zoo: Any = None, site: str | None = None, task: str | None = None
) -> tuple[Any, Any]:
    """(source, the segmenter whose tasks and preprocessing the samples follow) from a spec. zoo:K
    needs the zoo folder, the site, and one task (`task`, or the model's only one); its samples are
    that task's, in the model's preprocessing."""
    kind, n = parse_source(spec)
    if hasattr(seg, "segment_volume"):  # 3-D: the sources sample 2-D slices
        from weightzoo.nets.unet import require_2d

        require_2d(seg.spec, "--uncertainty", seg.name)
    if kind == "mc":
        return MCDropout(seg, n, seed), seg
    if kind == "tta":
        return TTA(seg, n), seg
    if zoo is None or site is None:
        raise InputError(f"--uncertainty {spec} needs a zoo and a site", "add --zoo ZOO and --site SITE")
    task = task or (seg.tasks[0] if len(seg.tasks) == 1 else None)
    if task is None:
        raise InputError("zoo ensembles are per task", "add --task TASK")
    ensemble = zoo_ensemble(zoo, task, site, n, seg.preprocessing)
    return ensemble, ensemble.members[0]


class SampledSegmenter:
    """A Segmenter whose K·4 output channels are the maps (mean, var, entropy, mi) of each task, so
    `segment_image` puts every map on the input's grid exactly as it does probabilities."""

    def __init__(self, seg: Any, source: Any):
        from weightzoo.uncertainty.maps import MAPS

        self.seg, self.source = seg, source
        self.name, self.preprocessing = seg.name, seg.preprocessing
        self.n_params, self.seconds_to_build = seg.n_params, seg.seconds_to_build
        self.tasks = [f"{t}_{m}" for t in seg.tasks for m in MAPS]

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        from weightzoo.uncertainty.maps import MAPS, uncertainty_maps

        maps = uncertainty_maps(self.source.samples(images))  # each [N, K, H, W]
        return torch.stack([maps[m] for m in MAPS], dim=2).flatten(1, 2).numpy()  # [N, K·4, H, W]

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_batch(np.asarray(image)[None])[0]
