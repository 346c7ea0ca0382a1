"""Sample networks from a delta generator (weightzoo.generate.delta) for a task set and a site.

    gen = DeltaGenerator.load("gen/")
    emb = gen.embed_images(folder_images("new_site/", gen.prep))     # a few unlabelled images
    res = gen.sample(["cord"], emb, candidates=8, seed=0)            # N networks in one batch
    i = gen.select_on_val(res, ["cord"], dataset, site="C") if labels else 0   # never the test split
    gen.save(res.states[i], ["cord"], "net/", res.seconds, info={})  # checked, then written

The site is given as unlabelled images (`embed_images`), as a site the zoo was trained on (`seen_site`,
the stored embedding of all its training images), or not at all (None: the "unknown site" prompt).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.slices import Preprocessing
from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.generate.delta import (
    BASE_FILE,
    KIND,
    RMS_MARGIN,
    DeltaDenoiser,
    DeltaLayout,
    base_network,
)
from weightzoo.generate.diffusion import ddim_loop
from weightzoo.generate.site_embedding import image_features, site_embedding
from weightzoo.generate.train import GEN_WEIGHTS, read_generator_json, read_state
from weightzoo.nets.unet import build_network, load_real_state_dict
from weightzoo.segmenter import save_model
from weightzoo.zoo.base import BaseNet, base_from_bytes

DEFAULT_DDIM_STEPS = 20


@dataclass
class DeltaSample:
    states: list[dict[str, torch.Tensor]]  # one per candidate, outputs = tasks
    tasks: list[str]
    site: str  # how the site was given: images | seen:A | unknown
    seconds: float
    seed: int


class DeltaGenerator:
    def __init__(
        self,
        folder: Path,
        meta: dict[str, Any],
        model: DeltaDenoiser,
        stats: dict[str, torch.Tensor],
        base: BaseNet,
    ):
        self.folder, self.meta, self.model, self.base = folder, meta, model.eval(), base
        self.mean, self.rms = stats["stats.mean"], stats["stats.rms"]
        self.mu, self.sd = stats["emb.mu"], stats["emb.sd"]
        self.layout = DeltaLayout(base, meta["subset"])
        self.prep = Preprocessing.from_dict(meta["preprocessing"], folder / "generator.json")
        self._net: torch.nn.Module | None = None

    @classmethod
    def load(cls, folder: str | Path) -> DeltaGenerator:
        folder = Path(folder)
        meta = read_generator_json(folder)
        if meta.get("kind") != KIND:
            raise InputError(
                "not a delta generator", "use `weightzoo generate sample` options of its kind", folder
            )
        tensors, _ = read_state(folder / GEN_WEIGHTS)
        described = folder / "generator.json"
        try:
            base = base_from_bytes(
                (folder / BASE_FILE).read_bytes(), meta["base_model"], str(folder / BASE_FILE), str(described)
            )
        except OSError as e:
            raise ModelError(
                f"the generator's base is missing ({e})", "re-run `weightzoo generate train`", folder
            ) from None
        if base.base_id != meta["base_id"]:
            raise ModelError(
                f"{BASE_FILE} is not the base generator.json names (base_id)",
                "re-run `weightzoo generate train`",
                described,
            )
        cfg = meta["config"]
        model = DeltaDenoiser(
            int(meta["numel"]), len(meta["tasks"]), int(meta["emb_dim"]), cfg["hidden"], cfg["depth"]
        )
        try:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        except RuntimeError:  # sizes in generator.json (numel, tasks, emb_dim, hidden, depth) were edited
            raise ModelError(
                f"generator.json's sizes do not match {GEN_WEIGHTS}",
                "re-run `weightzoo generate train` (or undo the edit)",
                described,
            ) from None
        return cls(folder, meta, model, tensors, base)

    # ---- conditions ---------------------------------------------------------------------------------
    def check_tasks(self, tasks: Sequence[str]) -> list[str]:
        for t in tasks:
            if t not in self.meta["tasks"]:
                raise UnknownNameError("task", t, self.meta["tasks"])
        if not tasks or len(set(tasks)) != len(tasks):
            raise InputError(f"tasks {list(tasks)} must be distinct and non-empty", "e.g. --task cord,gm")
        return list(tasks)

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        """Standardised site embedding [E] of unlabelled images [n, C, H, W] (preprocessed as self.prep)."""
        if self._net is None:
            self._net = base_network(self.base)
        return (site_embedding(image_features(self._net, images)) - self.mu) / self.sd

    def seen_site(self, site: str) -> torch.Tensor:
        if site not in self.meta["sites"]:
            raise UnknownNameError("site", site, sorted(self.meta["sites"]))
        return torch.tensor(self.meta["sites"][site])

    # ---- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        tasks: Sequence[str],
        site: torch.Tensor | None,
        candidates: int = 1,
        seed: int = 0,
        ddim_steps: int = DEFAULT_DDIM_STEPS,
        how: str = "images",
    ) -> DeltaSample:
        """`candidates` networks for `tasks` at the site described by `site` (None: unknown)."""
        t0 = time.perf_counter()
        tasks = self.check_tasks(tasks)
        n = max(1, int(candidates))
        hot = torch.tensor([[float(t in tasks) for t in self.meta["tasks"]]]).expand(n, -1)
        known = torch.full((n, 1), 0.0 if site is None else 1.0)
        emb = torch.zeros(n, len(self.mu)) if site is None else site.float()[None].expand(n, -1)
        x0 = ddim_loop(
            lambda x, t: self.model(x, t, hot, emb, known),
            (n, self.layout.numel),
            torch.device("cpu"),
            int(self.meta["config"]["timesteps"]),
            ddim_steps,
            torch.Generator().manual_seed(seed),
        )
        deltas = x0 * self.rms + self.mean
        states = [self.layout.state(d, tasks) for d in deltas]
        return DeltaSample(
            states, tasks, how if site is not None else "unknown", time.perf_counter() - t0, seed
        )

    def check(self, state: dict[str, torch.Tensor]) -> None:
        """Finite, and every tensor's RMS within the training zoo's range widened by RMS_MARGIN."""
        for k, v in state.items():
            if not torch.isfinite(v).all():
                raise ModelError(
                    f"generated weights rejected: tensor {k} has NaN/inf", "draw more --candidates"
                )
            lo, hi = self.meta["rms_range"].get(k, [0.0, float("inf")])
            rms = float(v.float().pow(2).mean().sqrt())
            if not (lo / RMS_MARGIN <= rms <= hi * RMS_MARGIN):
                raise ModelError(
                    f"generated weights rejected: tensor {k} has RMS {rms:.3g}, outside the zoo's range "
                    f"[{lo:.3g}, {hi:.3g}]",
                    "draw more --candidates, or train the generator longer",
                )

    def network(self, state: dict[str, torch.Tensor], tasks: Sequence[str]) -> torch.nn.Module:
        return load_real_state_dict(build_network(self.base.spec.with_classes(len(tasks))), state).eval()

    @torch.no_grad()
    def val_dice(
        self, states: Sequence[dict[str, torch.Tensor]], tasks: Sequence[str], dataset: Any, site: str | None
    ) -> list[dict[str, float]]:
        """Pseudo Dice per task of each state on the dataset's VALIDATION cases of `site` (all if None)."""
        from weightzoo.generate.merge import pseudo_dice, val_slices

        val = val_slices(dataset, tasks, self.prep, [site] if site else None)
        return [pseudo_dice(self.network(st, tasks), val, tasks) for st in states]

    def select_on_val(
        self, res: DeltaSample, dataset: Any, site: str | None
    ) -> tuple[int, list[dict[str, float]]]:
        """Index of the candidate with the best mean validation Dice (candidates failing checks skipped)."""
        scores = self.val_dice(res.states, res.tasks, dataset, site)
        best, best_v = 0, -1.0
        for i, (st, d) in enumerate(zip(res.states, scores, strict=True)):
            try:
                self.check(st)
            except ModelError:
                continue
            v = float(np.nanmean(list(d.values()))) if d else 0.0
            if v > best_v:
                best, best_v = i, v
        return best, scores

    def save(
        self,
        state: dict[str, torch.Tensor],
        tasks: Sequence[str],
        out: str | Path,
        seconds: float,
        info: dict[str, Any],
    ) -> Path:
        """Check, then write a weightzoo model folder (route "generate")."""
        self.check(state)
        meta = {
            "generator": str(self.folder),
            "kind": KIND,
            "base_id": self.base.base_id,
            "zoo": self.meta.get("zoo"),
            "dataset": self.meta.get("dataset"),
            **info,
        }
        return save_model(
            out,
            self.network(state, tasks),
            self.base.spec.with_classes(len(tasks)),
            list(tasks),
            self.prep,
            seconds,
            route="generate",
            info=meta,
        )
