"""Prompt a trained generator for a network: from a fresh initialisation or any checkpoint, one step
or k recursive steps, N candidates in one batch, optional selection on the VALIDATION split.

    gen = Generator.load("gen/")
    res = gen.sample(["cord"], {"cord": 0.95}, site="A", start=Start.from_init(7), candidates=16)
    best = select_on_val(gen, res, dataset)                       # never the test split
    gen.save(res.vectors[best.index], ["cord"], "net/", info=...)  # a weightzoo model folder

A prompt is (start parameters, their current Dice per task, the target Dice per task, the site). The
current Dice of a fresh initialisation is the median Dice of the zoo's initialisations; of a zoo
checkpoint, the Dice the zoo recorded; of a model folder, its final validation Dice (or give it).
Recursive prompting feeds the output back as the next start, with the target as its current Dice.

Every output is checked before it is written: no NaN/inf, and every tensor's RMS within the training
zoo's range (widened by `RMS_MARGIN`); otherwise a one-line ModelError.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.generate.diffusion import ParamDiffusion, ddim_sample
from weightzoo.generate.train import GEN_WEIGHTS, Scales, build_model, read_generator_json, read_state
from weightzoo.generate.vectors import TaskLayout
from weightzoo.nets.unet import (
    build_network,
    load_real_state_dict,
    real_state_dict,
    require_2d,
    require_plain_unet,
)
from weightzoo.segmenter import NetSegmenter, resolve_device, save_model

RMS_MARGIN = 2.0  # a generated tensor's RMS may lie in [zoo min / margin, zoo max · margin]
DEFAULT_DDIM_STEPS = 10


@dataclass
class Start:
    """Where a prompt starts: a fresh initialisation (`seed`) or a given state dict with its tasks."""

    seed: int | None = None
    state: dict[str, torch.Tensor] | None = None
    tasks: list[str] = field(default_factory=list)  # output k of `state` is tasks[k]
    dice: dict[str, float] = field(default_factory=dict)  # its current Dice per task, if known
    source: str = ""

    @classmethod
    def from_init(cls, seed: int) -> Start:
        return cls(seed=int(seed), source=f"init:{seed}")

    @classmethod
    def from_zoo(cls, zoo: Any, ckpt_id: str) -> Start:
        """A zoo checkpoint (weightzoo.zoo.Zoo) with the Dice the zoo recorded for it."""
        rec = zoo.checkpoint(ckpt_id)
        dice = {t: float(v) for t in rec.tasks if (v := rec.metrics.get(t, {}).get("val_dice")) is not None}
        return cls(state=zoo.load(rec), tasks=list(rec.tasks), dice=dice, source=f"zoo:{ckpt_id}")

    @classmethod
    def from_model(cls, folder: str | Path) -> Start:
        """A weightzoo model folder, with the final validation Dice its training recorded (if any)."""
        from weightzoo.segmenter import load_model, read_model_json

        meta = read_model_json(folder)
        seg = load_model(folder, "cpu")
        require_plain_unet(seg.spec, "weight generation", folder)
        require_2d(seg.spec, "weight generation", folder)
        final = (meta.get("info") or {}).get("final") or {}
        dice = {t: float(v) for t, v in (final.get("val_dice") or {}).items() if v is not None}
        return cls(state=real_state_dict(seg.net), tasks=list(seg.tasks), dice=dice, source=f"model:{folder}")


@dataclass
class SampleResult:
    """vectors [N, numel] in the generator's task layout (rows of other tasks are zero)."""

    vectors: torch.Tensor
    tasks: list[str]
    target: dict[str, float]
    site: list[str]
    start: str
    seconds: float
    steps: int
    ddim_steps: int
    seed: int


@dataclass
class Selection:
    index: int
    val_dice: list[dict[str, float]]  # per candidate, per task


class Generator:
    """A trained generator (its EMA weights) and what it knows of its zoo."""

    def __init__(
        self,
        model: ParamDiffusion,
        layout: TaskLayout,
        meta: dict[str, Any],
        device: torch.device,
        folder: Path,
    ):
        self.model, self.layout, self.meta, self.device, self.folder = (
            model.eval(),
            layout,
            meta,
            device,
            folder,
        )
        self.tasks: list[str] = list(meta["tasks"])
        self.sites: list[str] = list(meta["sites"])
        n = meta["norm"]
        if list(n["names"]) != layout.layout.names:
            raise ModelError("the generator's statistics belong to another layout", "re-train it", folder)
        self.scales = Scales.per_tensor(layout, n["mean"], n["std"], n["update"])

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> Generator:
        folder = Path(folder)
        meta = read_generator_json(folder)
        model, layout = build_model(meta)
        wpath = folder / GEN_WEIGHTS
        if not wpath.exists():
            raise ModelError(
                "generator weights are missing", f"the folder needs {GEN_WEIGHTS}; re-train", wpath
            )
        tensors, _ = read_state(wpath)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise ModelError(
                f"generator weights do not fit its config ({str(e)[:80]})", "re-train", wpath
            ) from None
        dev = resolve_device(device)
        return cls(model.to(dev), layout, meta, dev, folder)

    # ---- names ----------------------------------------------------------------------------------
    def check_tasks(self, tasks: Sequence[str]) -> list[str]:
        if not tasks:
            raise InputError("no task given", f"name one or more of: {', '.join(self.tasks)}")
        for t in tasks:
            if t not in self.tasks:
                raise UnknownNameError("task", t, self.tasks, f"generator {self.folder}")
        return list(tasks)

    def site_weights(self, site: str | Sequence[str] | None) -> tuple[torch.Tensor, list[str]]:
        """[S] weights for a site, several sites, or None (= "any site", also for sites not in the zoo)."""
        sites = [] if site is None else [site] if isinstance(site, str) else list(site)
        w = torch.zeros(len(self.sites))
        for s in sites:
            if s not in self.sites:
                raise UnknownNameError("site", s, self.sites, f"generator {self.folder}")
            w[self.sites.index(s)] = 1.0
        return w, sites

    # ---- vectors --------------------------------------------------------------------------------
    def start_vector(self, start: Start, tasks: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """The raw start vector (rows of tasks not asked for are zeroed) and its current Dice per task."""
        if start.state is None:
            if start.seed is None:
                raise InputError(
                    "a start needs a seed or a state", "use Start.from_init(SEED) or --from CKPT"
                )
            state = real_state_dict(build_network(self.layout.out_spec(tasks), seed=start.seed))
            vec, _ = self.layout.embed(state, tasks)
            dice = {t: self.meta["init_metric"].get(t, math.nan) for t in tasks}
        else:
            unknown = [t for t in start.tasks if t not in self.tasks]
            if unknown:
                raise UnknownNameError("task", unknown[0], self.tasks, start.source or "start checkpoint")
            vec, _ = self.layout.embed(start.state, start.tasks)
            dice = {t: start.dice.get(t, math.nan) for t in tasks}
        vec = vec * self.layout.mask(tasks)
        return vec, dice

    def _metrics(self, values: Mapping[str, float], tasks: Sequence[str]) -> torch.Tensor:
        m = torch.full((len(self.tasks),), math.nan)
        for t in tasks:
            v = values.get(t, math.nan)
            m[self.tasks.index(t)] = math.nan if v is None else float(v)
        return m

    @torch.no_grad()
    def prompt(
        self,
        start: torch.Tensor,
        current: torch.Tensor,
        target: torch.Tensor,
        site: torch.Tensor,
        mask: torch.Tensor,
        ddim_steps: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """One prompt step on a batch: raw start [B, numel], metrics [B, K], site [B, S] -> raw [B, numel]."""
        dev = self.device
        norm_start = (start - self.scales.mean) / self.scales.std * (mask & self.scales.trainable)
        x0 = ddim_sample(
            self.model,
            norm_start.to(dev),
            current.to(dev),
            target.to(dev),
            site.to(dev),
            ddim_steps,
            generator,
        ).cpu()
        update = x0 * self.scales.update * self.scales.trainable  # never-trained tensors stay as they start
        return (start + update) * mask  # global residual: start + update

    def sample(
        self,
        tasks: Sequence[str],
        target: Mapping[str, float] | float,
        site: str | Sequence[str] | None = None,
        start: Start | None = None,
        candidates: int = 1,
        steps: int = 1,
        ddim_steps: int = DEFAULT_DDIM_STEPS,
        seed: int = 0,
        current: Mapping[str, float] | None = None,
    ) -> SampleResult:
        """N candidate networks for `tasks` with target Dice `target` (one value or one per task).

        start: default a fresh initialisation with seed `seed`. steps: recursive prompt steps.
        current: the start's Dice per task (overrides what is known of it). Deterministic in `seed`."""
        tasks = self.check_tasks(tasks)
        tgt = {t: float(target) for t in tasks} if isinstance(target, (int, float)) else dict(target)
        missing = [t for t in tasks if t not in tgt]
        if missing:
            raise InputError(f"no target Dice for task {missing[0]}", "give --target-dice for every task")
        for t, v in tgt.items():
            if t in tasks and not 0.0 <= v <= 1.0:
                raise InputError(
                    f"target Dice {v} for {t} is outside [0, 1]", "ask for a Dice between 0 and 1"
                )
        if candidates < 1 or steps < 1 or ddim_steps < 1:
            raise InputError("candidates, steps and ddim_steps must be >= 1", "fix the options")
        start = start or Start.from_init(seed)
        site_w, site_list = self.site_weights(site)
        t0 = time.perf_counter()
        vec, cur = self.start_vector(start, tasks)
        cur.update({t: v for t, v in (current or {}).items() if t in tasks})
        unknown = [t for t in tasks if not math.isfinite(cur.get(t, math.nan))]
        if unknown:
            raise InputError(
                f"the start's current Dice for {unknown[0]} is unknown",
                "give it with --current-dice (measure it with `weightzoo evaluate --split val`)",
            )
        N = candidates
        mask = self.layout.mask(tasks).expand(N, -1)
        x = vec.expand(N, -1).clone()
        cur_m = self._metrics(cur, tasks).expand(N, -1)
        tgt_m = self._metrics(tgt, tasks).expand(N, -1)
        g = torch.Generator().manual_seed(int(seed))
        for _ in range(steps):
            x = self.prompt(x, cur_m, tgt_m, site_w.expand(N, -1), mask, ddim_steps, g)
            cur_m = tgt_m  # recursive prompting: the output is assumed to have reached the target
        return SampleResult(
            x,
            tasks,
            {t: tgt[t] for t in tasks},
            site_list,
            start.source,
            time.perf_counter() - t0,
            steps,
            ddim_steps,
            int(seed),
        )

    # ---- checks and output ----------------------------------------------------------------------
    def problems(self, vec: torch.Tensor, tasks: Sequence[str]) -> list[str]:
        """Why a generated vector may not be written (empty list: it is fine)."""
        mask = self.layout.mask(tasks)
        if not torch.isfinite(vec[mask]).all():
            bad = int((~torch.isfinite(vec[mask])).sum())
            return [f"{bad} generated value(s) are NaN or inf"]
        rms = self.layout.tensor_rms(vec, mask)
        lo = torch.tensor(self.meta["rms_min"]) / RMS_MARGIN
        hi = torch.tensor(self.meta["rms_max"]) * RMS_MARGIN + 1e-6
        out = []
        for k, name in enumerate(self.layout.layout.names):
            if not lo[k] <= rms[k] <= hi[k]:
                out.append(
                    f"tensor {name} has RMS {float(rms[k]):.3g}, outside the zoo's range [{float(lo[k]):.3g}, {float(hi[k]):.3g}]"
                )
        return out

    def check(self, vec: torch.Tensor, tasks: Sequence[str]) -> None:
        """Raise a one-line ModelError if `vec` has NaN/inf or a tensor norm outside the zoo's range."""
        bad = self.problems(vec, tasks)
        if bad:
            raise ModelError(
                f"generated weights rejected: {bad[0]}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                "ask for a target Dice within the zoo's range, draw more --candidates, or train the generator longer",
                self.folder,
            )

    def segmenter(
        self, vec: torch.Tensor, tasks: Sequence[str], device: str | torch.device = "cpu"
    ) -> NetSegmenter:
        """The network of a (checked) vector, with outputs `tasks`."""
        from weightzoo.data.slices import Preprocessing

        spec = self.layout.out_spec(tasks)
        net = load_real_state_dict(build_network(spec), self.layout.extract(vec, tasks))
        return NetSegmenter(
            net,
            spec,
            list(tasks),
            Preprocessing.from_dict(self.meta["preprocessing"], Path(self.folder) / "generator.json"),
            "generated",
            0.0,
            device,
        )

    def save(
        self, vec: torch.Tensor, tasks: Sequence[str], out: str | Path, seconds: float, info: dict[str, Any]
    ) -> Path:
        """Check `vec`, then write a weightzoo model folder (route "generate")."""
        self.check(vec, tasks)
        seg = self.segmenter(vec, tasks)
        meta = {
            "generator": str(self.folder),
            "zoo": self.meta.get("zoo"),
            "dataset": self.meta.get("dataset"),
            **info,
        }
        return save_model(
            out, seg.net, seg.spec, list(tasks), seg.preprocessing, seconds, route="generate", info=meta
        )


@torch.no_grad()
def select_on_val(
    gen: Generator,
    result: SampleResult,
    dataset: Any,
    sites: Sequence[str] | None = None,
    device: str = "cpu",
) -> Selection:
    """Validation Dice (pseudo Dice over all val slices of `sites`) of every candidate that passes the
    checks; returns the best one's index. The test split is never read."""
    from weightzoo.data.raw import RawDataset
    from weightzoo.data.slices import Preprocessing, load_slices
    from weightzoo.train.loop import evaluate_slices
    from weightzoo.train.losses import DiceBCELoss

    ds = dataset if isinstance(dataset, RawDataset) else RawDataset.open(dataset)
    sites = list(sites) if sites else (result.site or None)
    cases = ds.cases_in("val", sites)
    if not cases:
        raise InputError(
            f"no validation cases for sites {sites or 'all'}", "select on a dataset with a val split", ds.root
        )
    prep = Preprocessing.from_dict(gen.meta["preprocessing"], Path(gen.folder) / "generator.json")
    val = load_slices(ds, result.tasks, prep=prep, cases=cases)
    scores: list[dict[str, float]] = []
    best, best_score = -1, -math.inf
    for i, vec in enumerate(result.vectors):
        if gen.problems(vec, result.tasks):
            scores.append({t: math.nan for t in result.tasks})
            continue
        seg = gen.segmenter(vec, result.tasks, device)
        _, dice = evaluate_slices(seg.net, val, DiceBCELoss(), seg.device)
        d = dict(zip(result.tasks, dice, strict=True))
        scores.append(d)
        finite = [v for v in d.values() if math.isfinite(v)]
        score = sum(finite) / len(finite) if finite else -1.0
        if score > best_score:
            best, best_score = i, score
    if best < 0:
        gen.check(result.vectors[0], result.tasks)  # raises with the reason
    return Selection(best, scores)
