"""`generate eval`: what generated weights are worth, measured on the dataset's TEST split.

This module is the only place of the generator route that reads test subjects. Every selection
(the zoo's best checkpoint, best-of-N candidates, λ of task arithmetic/TIES) uses the VALIDATION
split; the test split only scores the selected networks. Results for each of >= 1 generators
(trained with different seeds) are reported as mean and spread over generators.

Parts (each a table in summary.json and the report):
  best        per (task, site of the zoo): test Dice of the zoo's best training-run checkpoint
              (chosen on val) vs generated one-shot from a fresh initialisation (an unseen seed),
              prompted with that checkpoint's val Dice; the same with best-of-N on val; and prompted
              with Dice 1.0 ("asking for more").
  alignment   target vs achieved test Dice over a sweep of targets (R² against the identity line,
              Pearson r; figure).
  general     starting points from held-out (test-split) runs' checkpoints, initialisations of
              training runs (seen seeds) vs fresh seeds (unseen), and a site that is not in the zoo
              (prompted with "any site").
  multitask   per-task test Dice of each specialist vs each unified network: generated (targets on
              every task), average, task arithmetic, TIES (weightzoo.generate.merge), and the best
              joint multi-task run of the zoo.
  time        sampling seconds vs training from scratch (the zoo's recipe) to the same val Dice, on
              the same device (one run each; a ratio).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing, SliceSet, load_slices
from weightzoo.errors import InputError
from weightzoo.evaluate.summary import evaluate_slices
from weightzoo.fileio import atomic_write_json
from weightzoo.generate.sample import Generator, Start
from weightzoo.nets.unet import build_network, load_real_state_dict
from weightzoo.segmenter import NetSegmenter
from weightzoo.zoo.store import Zoo

UNSEEN_SEED = 10_000  # fresh initialisations use seeds from here: never a zoo seed
ALIGN_TARGETS = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
PARTS = ("best", "alignment", "general", "multitask", "time")
MORE = 0.02  # "asking for more": prompt the best checkpoint itself with its val Dice + MORE


# ---- data and scoring -------------------------------------------------------------------------------
class Scorer:
    """Dice per task of networks on cached slices of a split (val or test) and site."""

    def __init__(self, ds: RawDataset, prep: Preprocessing, device: str | torch.device = "cpu"):
        self.ds, self.prep, self.device = ds, prep, torch.device(device)
        self._cache: dict[tuple[str, str | None], SliceSet | None] = {}

    def slices(self, split: str, site: str | None) -> SliceSet | None:
        key = (split, site)
        if key not in self._cache:
            cases = self.ds.cases_in(split, [site] if site else None)
            self._cache[key] = (
                load_slices(self.ds, list(self.ds.tasks), prep=self.prep, cases=cases) if cases else None
            )
        return self._cache[key]

    def dice(self, seg: NetSegmenter, split: str, site: str | None) -> dict[str, float]:
        """Mean per-case Dice of each of the network's tasks (NaN where undefined)."""
        ss = self.slices(split, site)
        if ss is None:
            return {t: math.nan for t in seg.tasks}
        if seg.device != self.device:
            seg = NetSegmenter(seg.net, seg.spec, seg.tasks, seg.preprocessing, seg.name, 0.0, self.device)
        summary = evaluate_slices(seg, ss, tasks=seg.tasks)
        return {t: float(summary["mean"][t]["Dice"]) for t in seg.tasks}


def zoo_segmenter(zoo: Zoo, rec: Any, prep: Preprocessing) -> NetSegmenter:
    spec = zoo.spec(rec.arch_hash)
    net = load_real_state_dict(build_network(spec), zoo.load(rec))
    return NetSegmenter(net, spec, list(rec.tasks), prep, rec.ckpt_id, 0.0, "cpu")


def best_checkpoint(zoo: Zoo, task: str, site: str, split: str = "train", multi: bool = False) -> Any | None:
    """The checkpoint with the highest val Dice (mean over its tasks when `multi`) among `split` runs
    trained on exactly `site`: single-task runs of `task`, or multi-task runs that include it."""
    best, score = None, -math.inf
    for c in zoo.checkpoints(task=task, site=site, split=split):
        if c.sites != [site] or (len(c.tasks) > 1) != multi:
            continue
        vals = [c.metrics.get(t, {}).get("val_dice") for t in c.tasks]
        vals = [v for v in vals if v is not None]
        s = float(np.mean(vals)) if vals else -math.inf
        if s > score:
            best, score = c, s
    return best


def _val(c: Any, task: str) -> float:
    v = c.metrics.get(task, {}).get("val_dice")
    return math.nan if v is None else float(v)


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def fmt(values: Sequence[float]) -> str:
    m, s, n = mean_sd(values)
    if n == 0:
        return "–"
    return f"{m:.3f}" if n == 1 else f"{m:.3f} ± {s:.3f}"


def r_squared(target: Sequence[float], achieved: Sequence[float]) -> float:
    """R² of the prompt as a prediction of the achieved Dice: 1 − Σ(a−t)² / Σ(a−ā)²."""
    t, a = np.asarray(target, float), np.asarray(achieved, float)
    ok = np.isfinite(t) & np.isfinite(a)
    t, a = t[ok], a[ok]
    ss_tot = float(((a - a.mean()) ** 2).sum()) if a.size else 0.0
    return 1 - float(((a - t) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan


# ---- the evaluation ---------------------------------------------------------------------------------
def evaluate_generators(
    generators: Sequence[str | Path],
    zoo: Zoo | str | Path,
    dataset: RawDataset | str | Path,
    out_dir: str | Path,
    candidates: int = 8,
    ddim_steps: int = 10,
    targets: Sequence[float] = ALIGN_TARGETS,
    parts: Sequence[str] = PARTS,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run `parts` (see the module docstring); write out_dir/summary.json and report.html.

    device: where generators sample, networks are scored and the time-to-a-model run trains."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        from weightzoo.errors import UnknownNameError

        raise UnknownNameError("evaluation part", unknown[0], PARTS)
    t_all = time.perf_counter()
    zoo = zoo if isinstance(zoo, Zoo) else Zoo(zoo)
    ds = dataset if isinstance(dataset, RawDataset) else RawDataset.open(dataset)
    gens = [Generator.load(g, device) for g in generators]
    if not gens:
        raise InputError("no generator given", "pass --generator gen/ (repeatable, one per generator seed)")
    g0 = gens[0]
    for g in gens[1:]:
        if g.tasks != g0.tasks or g.sites != g0.sites or g.meta["body_key"] != g0.meta["body_key"]:
            raise InputError(
                "the generators were trained on different zoos",
                "evaluate generators of one zoo together",
                g.folder,
            )
    prep = Preprocessing.from_dict(g0.meta["preprocessing"])
    scorer = Scorer(ds, prep, device)
    tasks, zoo_sites = g0.tasks, g0.sites
    unseen_sites = [s for s in ds.sites() if s not in zoo_sites]
    res: dict[str, Any] = {
        "generators": [str(g.folder) for g in gens],
        "generator_seeds": [g.meta["train"]["seed"] for g in gens],
        "tasks": tasks,
        "zoo_sites": zoo_sites,
        "unseen_sites": unseen_sites,
        "candidates": candidates,
        "ddim_steps": ddim_steps,
    }

    sample_secs: list[float] = []
    bests: dict[tuple[str, str], Any] = {}
    for t in tasks:
        for s in zoo_sites:
            b = best_checkpoint(zoo, t, s)
            if b is not None:
                bests[(t, s)] = b

    # -- best checkpoint vs generated ------------------------------------------------------------
    if "best" in parts:
        log("evaluating: generated vs the zoo's best checkpoint")
        res["best"], sample_secs = _best(gens, zoo, scorer, prep, bests, candidates, ddim_steps)

    # -- prompt alignment -------------------------------------------------------------------------
    if "alignment" in parts:
        log("evaluating: prompt alignment")
        res["alignment"] = _alignment(gens, zoo, scorer, bests, targets, ddim_steps)

    # -- generalisation ---------------------------------------------------------------------------
    if "general" in parts:
        log("evaluating: generalisation (held-out runs, seeds, sites)")
    gen_rows = []
    for (t, s), b in bests.items() if "general" in parts else []:
        target = {t: _val(b, t)}
        held = [
            c for c in zoo.checkpoints(task=t, site=s, split="test") if len(c.tasks) == 1 and c.sites == [s]
        ]
        starts: dict[str, list[Any]] = {
            "held-out run, init": [c for c in held if c.kind == "init"],
            "held-out run, mid-training": [c for c in held if c.kind == "random"][::4],
            "training run init (seen seed)": [
                c
                for c in zoo.checkpoints(task=t, site=s, split="train", kind="init")
                if len(c.tasks) == 1 and c.sites == [s]
            ][:3],
        }
        for name, recs in starts.items():
            if not recs:
                continue
            before = [scorer.dice(zoo_segmenter(zoo, c, prep), "test", s)[t] for c in recs]
            n = candidates if name.startswith("held-out run, mid") else 1  # the mode that may help
            after, picked = [], []
            for gi, g in enumerate(gens):
                for c in recs:
                    r = g.sample(
                        [t],
                        target,
                        site=s,
                        start=Start.from_zoo(zoo, c.ckpt_id),
                        candidates=n,
                        ddim_steps=ddim_steps,
                        seed=gi,
                    )
                    after.append(_test(g, scorer, r.vectors[0], [t], s)[t])
                    if n > 1:
                        pick = _select(g, scorer, r.vectors, [t], s)
                        picked.append(
                            _test(g, scorer, r.vectors[pick], [t], s)[t] if pick is not None else math.nan
                        )
            row = {
                "task": t,
                "site": s,
                "start": name,
                "n starts": len(recs),
                "start test": before,
                "generated test": after,
            }
            if picked:
                row[f"generated best-of-{n} (val)"] = picked
            gen_rows.append(row)
        after = []
        for gi, g in enumerate(gens):
            for k in range(3):
                r = g.sample(
                    [t],
                    target,
                    site=s,
                    start=Start.from_init(UNSEEN_SEED + 100 + 10 * gi + k),
                    ddim_steps=ddim_steps,
                    seed=gi,
                )
                after.append(_test(g, scorer, r.vectors[0], [t], s)[t])
        init_dice = g0.meta["init_metric"].get(t, math.nan)
        gen_rows.append(
            {
                "task": t,
                "site": s,
                "start": "fresh init (unseen seed)",
                "n starts": 3,
                "start test": [init_dice],
                "generated test": after,
            }
        )
    for t in tasks if "general" in parts else []:
        for u in unseen_sites:
            cands = [bests[(t, s)] for s in zoo_sites if (t, s) in bests]
            if not cands:
                continue
            b = max(cands, key=lambda c: _val(c, t))
            zoo_u = scorer.dice(zoo_segmenter(zoo, b, prep), "test", u)[t]
            after = []
            for gi, g in enumerate(gens):
                r = g.sample(
                    [t],
                    {t: _val(b, t)},
                    site=None,
                    start=Start.from_init(UNSEEN_SEED + gi),
                    ddim_steps=ddim_steps,
                    seed=gi,
                )
                after.append(_test(g, scorer, r.vectors[0], [t], u)[t])
            gen_rows.append(
                {
                    "task": t,
                    "site": u,
                    "start": "site not in the zoo (any-site prompt)",
                    "n starts": 1,
                    "start test": [zoo_u],
                    "generated test": after,
                    "note": "start test = zoo best checkpoint on this site",
                }
            )
    res["general"] = gen_rows

    # -- multi-task -------------------------------------------------------------------------------
    if "multitask" in parts and len(tasks) > 1:
        log("evaluating: multi-task table")
        res["multitask"] = _multitask(
            gens, zoo, ds, scorer, prep, tasks, zoo_sites, bests, candidates, ddim_steps, log
        )

    # -- time to a model --------------------------------------------------------------------------
    if "time" in parts and bests:
        log("evaluating: time to a model (training from scratch for comparison)")
        res["time"] = _time_to_model(g0, zoo, ds, scorer, prep, bests, ddim_steps, out_dir, log)
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    res["sample_seconds_per_network"] = mean_sd(sample_secs)[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "summary.json", _jsonable(res))
    write_report(res, out_dir)
    return res


def _best(
    gens: list[Generator],
    zoo: Zoo,
    scorer: Scorer,
    prep: Preprocessing,
    bests: dict[tuple[str, str], Any],
    candidates: int,
    ddim_steps: int,
) -> tuple[list[dict[str, Any]], list[float]]:
    """Per (task, site): the zoo's best checkpoint vs generated networks (test Dice, lists per generator)."""
    rows, secs = [], []
    for (t, s), b in bests.items():
        one, sel, more, beyond = [], [], [], []
        for gi, g in enumerate(gens):
            seed = UNSEEN_SEED + gi
            r = g.sample(
                [t],
                {t: _val(b, t)},
                site=s,
                start=Start.from_init(seed),
                candidates=candidates,
                ddim_steps=ddim_steps,
                seed=seed,
            )
            secs.append(r.seconds / candidates)
            one.append(_test(g, scorer, r.vectors[0], [t], s)[t])
            pick = _select(g, scorer, r.vectors, [t], s)
            sel.append(_test(g, scorer, r.vectors[pick], [t], s)[t] if pick is not None else math.nan)
            r1 = g.sample(
                [t], {t: 1.0}, site=s, start=Start.from_init(seed), ddim_steps=ddim_steps, seed=seed
            )
            more.append(_test(g, scorer, r1.vectors[0], [t], s)[t])
            up = {t: min(1.0, _val(b, t) + MORE)}
            r2 = g.sample(
                [t], up, site=s, start=Start.from_zoo(zoo, b.ckpt_id), ddim_steps=ddim_steps, seed=gi
            )
            beyond.append(_test(g, scorer, r2.vectors[0], [t], s)[t])
        rows.append(
            {
                "task": t,
                "site": s,
                "zoo best val": round(_val(b, t), 4),
                "zoo best test": scorer.dice(zoo_segmenter(zoo, b, prep), "test", s)[t],
                "generated one-shot": one,
                f"generated best-of-{candidates} (val)": sel,
                "generated, target 1.0": more,
                f"from the best checkpoint, target +{MORE}": beyond,
            }
        )
    return rows, secs


def _alignment(
    gens: list[Generator],
    zoo: Zoo,
    scorer: Scorer,
    bests: dict[tuple[str, str], Any],
    targets: Sequence[float],
    ddim_steps: int,
) -> dict[str, Any]:
    """Target vs achieved test Dice, from a fresh initialisation and from held-out runs' checkpoints."""
    points = []
    for gi, g in enumerate(gens):
        for t, s in bests:
            held = [
                c
                for c in zoo.checkpoints(task=t, site=s, split="test", kind="random")
                if len(c.tasks) == 1 and c.sites == [s]
            ]
            starts = [("fresh init", Start.from_init(UNSEEN_SEED + gi))]
            if held:
                starts.append(("held-out checkpoint", Start.from_zoo(zoo, held[len(held) // 2].ckpt_id)))
            for name, start in starts:
                for tg in targets:
                    r = g.sample([t], {t: tg}, site=s, start=start, ddim_steps=ddim_steps, seed=gi)
                    achieved = _test(g, scorer, r.vectors[0], [t], s)[t]
                    points.append(
                        {
                            "generator": gi,
                            "start": name,
                            "task": t,
                            "site": s,
                            "target": tg,
                            "achieved": achieved,
                        }
                    )
    out: dict[str, Any] = {"points": points}
    for name in ("fresh init", "held-out checkpoint"):
        ps = [p for p in points if p["start"] == name]
        if not ps:
            continue
        r2 = [
            r_squared(
                [p["target"] for p in ps if p["generator"] == gi],
                [p["achieved"] for p in ps if p["generator"] == gi],
            )
            for gi in range(len(gens))
        ]
        ok = [p for p in ps if math.isfinite(p["achieved"])]
        r = (
            float(np.corrcoef([p["target"] for p in ok], [p["achieved"] for p in ok])[0, 1])
            if len(ok) > 2 and np.std([p["achieved"] for p in ok]) > 0
            else math.nan
        )
        out[name] = {"r2_per_generator": r2, "pearson_r": r}
    return out


def _test(
    g: Generator, scorer: Scorer, vec: torch.Tensor, tasks: list[str], site: str | None
) -> dict[str, float]:
    """Test Dice of a generated vector; NaN for every task if it fails the output checks."""
    if g.problems(vec, tasks):
        return {t: math.nan for t in tasks}
    return scorer.dice(g.segmenter(vec, tasks), "test", site)


def _select(
    g: Generator, scorer: Scorer, vecs: torch.Tensor, tasks: list[str], site: str | None
) -> int | None:
    best, score = None, -math.inf
    for i, v in enumerate(vecs):
        if g.problems(v, tasks):
            continue
        d = scorer.dice(g.segmenter(v, tasks), "val", site)
        m = mean_sd(list(d.values()))[0]
        if math.isfinite(m) and m > score:
            best, score = i, m
    return best


def _multitask(
    gens: list[Generator],
    zoo: Zoo,
    ds: RawDataset,
    scorer: Scorer,
    prep: Preprocessing,
    tasks: list[str],
    sites: list[str],
    bests: dict[tuple[str, str], Any],
    candidates: int,
    ddim_steps: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    from weightzoo.generate.merge import METHODS, merge_zoo, network

    rows = []
    for s in sites:
        if not all((t, s) in bests for t in tasks):
            continue
        spec_row = {t: scorer.dice(zoo_segmenter(zoo, bests[(t, s)], prep), "test", s)[t] for t in tasks}
        rows.append(
            {"site": s, "network": "specialists (one per task)", **{t: [v] for t, v in spec_row.items()}}
        )
        target = {t: _val(bests[(t, s)], t) for t in tasks}
        one: dict[str, list[float]] = {t: [] for t in tasks}
        sel: dict[str, list[float]] = {t: [] for t in tasks}
        for gi, g in enumerate(gens):
            r = g.sample(
                tasks,
                target,
                site=s,
                start=Start.from_init(UNSEEN_SEED + gi),
                candidates=candidates,
                ddim_steps=ddim_steps,
                seed=gi,
            )
            d1 = _test(g, scorer, r.vectors[0], tasks, s)
            pick = _select(g, scorer, r.vectors, tasks, s)
            d2 = (
                _test(g, scorer, r.vectors[pick], tasks, s)
                if pick is not None
                else {t: math.nan for t in tasks}
            )
            for t in tasks:
                one[t].append(d1[t])
                sel[t].append(d2[t])
        rows.append({"site": s, "network": "generated one-shot", **one})
        rows.append({"site": s, "network": f"generated best-of-{candidates} (val)", **sel})
        for method in METHODS:
            try:
                m = merge_zoo(zoo, tasks, method, site=s, dataset=ds, prep=prep)
            except InputError as e:
                log(f"  {method} on site {s}: {e}")
                continue
            seg = NetSegmenter(
                network(m.layout, m.vector, tasks), m.layout.out_spec(tasks), tasks, prep, method
            )
            d = scorer.dice(seg, "test", s)
            lam = f" (λ={m.lam:g})" if m.lam is not None else ""
            rows.append({"site": s, "network": f"{method}{lam}", **{t: [d[t]] for t in tasks}})
        joint = best_checkpoint(zoo, tasks[0], s, multi=True)
        if joint is not None and set(tasks) <= set(joint.tasks):
            d = scorer.dice(zoo_segmenter(zoo, joint, prep), "test", s)
            rows.append(
                {"site": s, "network": "joint multi-task run (zoo best on val)", **{t: [d[t]] for t in tasks}}
            )
    return rows


def _time_to_model(
    g: Generator,
    zoo: Zoo,
    ds: RawDataset,
    scorer: Scorer,
    prep: Preprocessing,
    bests: dict[tuple[str, str], Any],
    ddim_steps: int,
    out_dir: str | Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Seconds to sample one network (one-shot from a fresh initialisation) vs seconds for the zoo's
    recipe, trained from scratch on the same device, to first reach the generated network's val Dice.
    The (task, site) is the one where the one-shot network gains most over its initialisation."""
    import shutil

    from weightzoo.train.config import TrainConfig
    from weightzoo.train.loop import train_on_slices

    gains = {}
    for (t_, s_), b_ in bests.items():
        r_ = g.sample([t_], {t_: _val(b_, t_)}, site=s_, start=Start.from_init(UNSEEN_SEED + 999), seed=0)
        d = (
            scorer.dice(g.segmenter(r_.vectors[0], [t_]), "val", s_)[t_]
            if not g.problems(r_.vectors[0], [t_])
            else 0
        )
        gains[(t_, s_)] = (0.0 if math.isnan(d) else d) - g.meta["init_metric"].get(t_, 0.0)
    t, s = max(gains, key=lambda k: gains[k])
    b = bests[(t, s)]
    t0 = time.perf_counter()
    r = g.sample(
        [t], {t: _val(b, t)}, site=s, start=Start.from_init(UNSEEN_SEED + 999), ddim_steps=ddim_steps, seed=0
    )
    seg = g.segmenter(r.vectors[0], [t], scorer.device)
    if scorer.device.type == "cuda":
        torch.cuda.synchronize(scorer.device)
    sample_s = time.perf_counter() - t0
    gen_val = scorer.dice(seg, "val", s)[t]
    run = zoo.run(b.run_id)
    known = set(TrainConfig.__dataclass_fields__)
    cfg_d = {k: v for k, v in run.config.items() if k in known}
    cfg_d.update(
        tasks=[t],
        seed=UNSEEN_SEED + 999,
        val_every=max(1, int(cfg_d.get("steps", 100)) // 60),
        device=str(scorer.device),
    )
    cfg = TrainConfig.from_dict(cfg_d)
    train = load_slices(ds, [t], prep=prep, cases=ds.cases_in("train", [s]))
    val = scorer.slices("val", s)
    assert val is not None
    val_t = SliceSet(val.images, val.labels[:, [list(val.tasks).index(t)]], [t], val.meta, val.preprocessing)
    tmp = Path(out_dir) / "_scratch_run"
    shutil.rmtree(tmp, ignore_errors=True)
    result = train_on_slices(train, val_t, cfg, tmp, resume=False, progress=False, force=True)
    shutil.rmtree(tmp, ignore_errors=True)
    # the history's val Dice is the pseudo Dice of all val slices; compare like with like
    hist = [(h["step"], h["seconds"], h["val_dice"][t]) for h in result.history]
    gen_pseudo = _pseudo_val(seg, val_t, t)
    reached = next(((st, sec) for st, sec, d in hist if d >= gen_pseudo), None)
    train_s = reached[1] if reached else result.seconds
    return {
        "task": t,
        "site": s,
        "generated val Dice (pseudo)": gen_pseudo,
        "generated val Dice (per case)": gen_val,
        "sample seconds": sample_s,
        "scratch steps to reach it": reached[0] if reached else None,
        "scratch seconds": train_s,
        "scratch reached it": reached is not None,
        "scratch final val Dice": hist[-1][2] if hist else math.nan,
        "scratch seconds (whole run)": result.seconds,
        "ratio": train_s / max(sample_s, 1e-9),
        "generated gain over its init (val)": gains[(t, s)],
        "device": str(scorer.device),
    }


def _pseudo_val(seg: NetSegmenter, val: SliceSet, task: str) -> float:
    from weightzoo.train.loop import evaluate_slices as eval_pseudo
    from weightzoo.train.losses import DiceBCELoss

    _, dice = eval_pseudo(seg.net, val, DiceBCELoss(), seg.device)
    return float(dice[0])


# ---- output -----------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 5)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with lists (one value per generator / start) written as 'mean ± sd'."""
    return [{k: fmt(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]


def write_report(res: dict[str, Any], out_dir: Path) -> Path:
    from weightzoo.evaluate.report import Report

    rep = Report(out_dir, "weightzoo generate eval")
    rep.section(
        "Setup",
        f"{len(res['generators'])} generator(s) (seeds {res['generator_seeds']}); tasks {', '.join(res['tasks'])}; "
        f"zoo sites {', '.join(res['zoo_sites'])}; sites not in the zoo: {', '.join(res['unseen_sites']) or 'none'}. "
        "All selections on the validation split; Dice on the test split; mean ± sd over generators.",
    )
    if res.get("best"):
        rep.section("Generated vs the zoo's best checkpoint (test Dice)")
        rep.table(table_rows(res["best"]))
    if res.get("alignment"):
        al = res["alignment"]
        lines = [
            f"from {name}: R² (prompt as prediction) per generator "
            f"{', '.join(f'{v:.3f}' for v in al[name]['r2_per_generator'])}; Pearson r {al[name]['pearson_r']:.3f}"
            for name in ("fresh init", "held-out checkpoint")
            if name in al
        ]
        rep.section("Prompt alignment", "; ".join(lines) + ".")
        rep.figure(alignment_figure(al["points"]), "alignment", "Target vs achieved test Dice")
    if res.get("general"):
        rep.section("Generalisation (test Dice)")
        rep.table(table_rows(res["general"]))
    if res.get("multitask"):
        rep.section("One network for several tasks (test Dice per task)")
        rep.table(table_rows(res["multitask"]))
    if res.get("time"):
        rep.section("Time to a model")
        rep.table([dict(res["time"])])
    return rep.write()


def alignment_figure(points: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for start, marker in (("fresh init", "x"), ("held-out checkpoint", "o")):
        for t in sorted({p["task"] for p in points}):
            ps = [p for p in points if p["task"] == t and p.get("start", "fresh init") == start]
            if ps:
                xs, ys = [p["target"] for p in ps], [p["achieved"] for p in ps]
                ax.scatter(xs, ys, label=f"{t}, {start}", alpha=0.7, s=18, marker=marker)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("target Dice (prompt)")
    ax.set_ylabel("achieved test Dice")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return fig
