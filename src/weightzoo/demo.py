"""`weightzoo demo`: built-in phantoms → one small nnU-Net per task → evaluation → table + report.html.

Trains on one site ("A") and evaluates on that site's held-out test subjects and on the test subjects
of the other sites, which the models never saw: the gap is the site shift that later routes (zoo,
generated weights, site heads, in-context) are meant to close. Everything is local; on 2 CPU cores the
default settings finish in a few minutes.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import load_slices
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.errors import InputError, UnknownNameError
from weightzoo.evaluate.report import Report
from weightzoo.evaluate.summary import evaluate_segmenter, write_summary
from weightzoo.fileio import atomic_write_json
from weightzoo.segmenter import NetSegmenter
from weightzoo.train.loop import TrainConfig, TrainResult, train_model

DEMO_TASKS = ("cord", "gm", "canal", "lesion")
ROUTES = ("zoo", "delta", "generate", "heads", "incontext", "prune", "uncertainty", "hyper")
DEFAULT_ROUTES = (
    "zoo",
    "delta",
    "heads",
    "incontext",
    "prune",
    "uncertainty",
    "hyper",
)  # "generate" (G.pt-style) on request


@dataclass
class DemoSettings:
    """Sized so that the whole demo runs in a few minutes on 2 CPU cores."""

    tasks: tuple[str, ...] = DEMO_TASKS
    train_site: str = "A"
    sites: int = 4
    subjects_per_site: int = 16
    size: int = 64
    n_slices: int = 8
    preset: str = "small"
    steps: int = 150
    batch_size: int = 12
    seed: int = 0
    device: str = "auto"
    # Later routes, each sized from a short timing to about its budget (seconds on 2 CPU cores).
    routes: tuple[str, ...] = DEFAULT_ROUTES
    route_seconds: tuple[tuple[str, float], ...] = (
        ("zoo", 45.0),
        ("delta", 45.0),
        ("generate", 30.0),
        ("heads", 30.0),
        ("incontext", 10.0),
    )  # prune: 30 fine-tuning steps per method (~18 s); hyper: 150 tiny steps (~6 s)
    # seconds per training step of the first task model on the machine the budgets were set on
    # (2026-11-22, 2 cores: 150 steps in ~19.5 s). A slower machine gets every later route's budget
    # (and the fixed step counts) divided by its slowness, so the demo keeps to its 5 minutes.
    reference_seconds_per_step: float = 0.13


def _stats(
    summary: dict[str, Any], task: str, site: str | None = None, metric: str = "Dice"
) -> tuple[float, float, int]:
    """Mean, sd and count of a per-case metric, optionally for one site (NaN cases excluded)."""
    vals = [
        c["metrics"][task][metric]
        for c in summary["metric_per_case"]
        if (site is None or c["site"] == site) and c["metrics"][task][metric] is not None
    ]
    vals = [v for v in vals if not np.isnan(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    return float(np.mean(vals)), float(np.std(vals)), len(vals)


def _pm(mean: float, sd: float) -> str:
    return "–" if np.isnan(mean) else f"{mean:.3f} ± {sd:.3f}"


def run_demo(
    out: str | Path, settings: DemoSettings | None = None, progress: bool = True, log: Any = print
) -> dict[str, Any]:
    """Run the demo into `out`; returns the results dict also written to `out/summary.json`."""
    s = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    data_parent = out / "data"
    existing = sorted(data_parent.glob("Dataset*_DemoPhantom")) if data_parent.exists() else []
    if existing:  # re-running the demo reuses its data (and resumes/skips finished models)
        ds = RawDataset.open(existing[0])
    else:
        ds = make_phantom_dataset(
            data_parent, s.sites, s.subjects_per_site, s.size, s.n_slices, s.seed, name="DemoPhantom"
        )
    t_data = time.perf_counter() - t_start
    other_sites = [x for x in ds.sites() if x != s.train_site]
    log(f"data: {ds.root} ({len(ds.cases())} subjects, sites {', '.join(ds.sites())}) in {t_data:.1f}s")

    results: dict[str, Any] = {
        "settings": s.__dict__ | {"tasks": list(s.tasks)},
        "dataset": str(ds.root),
        "tasks": {},
    }
    trained: dict[str, TrainResult] = {}
    summaries: dict[str, dict[str, Any]] = {}
    slowness = 1.0
    for task in s.tasks:
        cfg = TrainConfig(
            tasks=[task],
            preset=s.preset,
            steps=s.steps,
            batch_size=s.batch_size,
            seed=s.seed,
            device=s.device,
            size=(s.size, s.size),
            val_every=max(1, s.steps // 5),
            checkpoint_every=max(1, s.steps // 5),
        )
        res = train_model(ds, cfg, out / "models" / task, sites=[s.train_site], progress=progress)
        if not trained and not res.skipped and res.resumed_from == 0:  # the first model times this machine
            slowness = max(1.0, res.seconds / s.steps / s.reference_seconds_per_step)
        trained[task] = res
        summ = evaluate_segmenter(res.segmenter, ds, split="test")  # all sites' held-out subjects
        write_summary(summ, out / "models" / task / "summary_test.json")
        summaries[task] = summ
        same = _stats(summ, task, s.train_site)
        unseen = [_stats(summ, task, x) for x in other_sites]
        results["tasks"][task] = {
            "model": str(res.out_dir),
            "train_seconds": round(res.seconds, 2),
            "n_params": res.segmenter.n_params,
            "dice_same_site": {"mean": same[0], "sd": same[1], "n": same[2]},
            "dice_unseen_sites": {
                x: {"mean": u[0], "sd": u[1], "n": u[2]} for x, u in zip(other_sites, unseen, strict=True)
            },
            "hd95_same_site": _stats(summ, task, s.train_site, "HD95")[0],
        }
        log(
            f"{task}: trained in {res.seconds:.0f}s; test Dice site {s.train_site} {_pm(*same[:2])}; "
            + ", ".join(f"site {x} {u[0]:.3f}" for x, u in zip(other_sites, unseen, strict=True))
        )

    rep = Report(out, "weightzoo demo")
    results["device"] = _device_line(s.device)
    _foundation_sections(rep, ds, s, results, trained, summaries, other_sites)
    results["slowness"] = round(slowness, 2)
    if slowness > 1.1:
        log(
            f"this machine trains {slowness:.2f}x slower than the reference: later routes get 1/{slowness:.2f} of their budgets"
        )
    results["routes"] = _run_routes(rep, out, ds, s, log, slowness)
    results["seconds_total"] = round(time.perf_counter() - t_start, 1)
    rep.section("Reproduce")
    rep.text(
        f"weightzoo demo --out {out}  (seed {s.seed}; device {results['device']}; total {results['seconds_total']} s; "
        f"this machine trained {slowness:.2f}x slower than the reference, so later routes ran on 1/{slowness:.2f} "
        "of their budgets)"
    )
    rep.write(meta=f"weightzoo demo · {time.strftime('%Y-%m-%d %H:%M')} · {results['device']}")
    atomic_write_json(out / "summary.json", _jsonable(results))
    return results


def _run_routes(
    rep: Report, out: Path, ds: RawDataset, s: DemoSettings, log: Any, slowness: float = 1.0
) -> dict[str, Any]:
    """The later routes on the same phantoms, each adding its own section to the report. Budgets and
    fixed step counts are divided by `slowness` (see DemoSettings.reference_seconds_per_step)."""
    budget = {k: v / slowness for k, v in s.route_seconds}
    done: dict[str, Any] = {}
    for route in s.routes:
        t0 = time.perf_counter()
        if route == "zoo":
            from weightzoo.zoo.demo import demo_zoo

            done["zoo"] = demo_zoo(out, ds, rep, log, budget["zoo"], min_steps=max(20, round(40 / slowness)))
        elif route == "generate":
            from weightzoo.generate.demo import demo_generate

            if "zoo" not in done:
                raise InputError(
                    "the generate route needs the zoo route", "run the demo with --routes zoo,generate"
                )
            done["generate"] = demo_generate(out, done["zoo"]["zoo"], ds, rep, log, budget["generate"])
        elif route == "delta":
            from weightzoo.generate.delta_demo import demo_delta

            # its budget is in seconds of the reference machine (it sets step counts, timing nothing),
            # so a slower machine divides it twice: fewer seconds, and slower ones
            done["delta"] = demo_delta(out, ds, rep, log, budget["delta"] / slowness)
        elif route == "heads":
            from weightzoo.heads.demo import demo_heads

            done["heads"] = demo_heads(out, ds, rep, log, budget["heads"])
        elif route == "incontext":
            from weightzoo.incontext.demo import demo_incontext

            done["incontext"] = demo_incontext(out, rep, log, budget["incontext"])
        elif route == "uncertainty":
            from weightzoo.uncertainty.demo import demo_uncertainty

            task = "cord" if "cord" in s.tasks else s.tasks[0]
            done["uncertainty"] = demo_uncertainty(ds, out / "models" / task, s.train_site, rep, log)
        elif route == "prune":
            from weightzoo.prune.demo import demo_prune

            task = "cord" if "cord" in s.tasks else s.tasks[0]
            steps = max(10, round(30 / slowness))
            done["prune"] = demo_prune(out, ds, out / "models" / task, s.train_site, rep, log, steps)
        elif route == "hyper":
            from weightzoo.hyper.demo import demo_hyper

            done["hyper"] = demo_hyper(out, ds, s.train_site, rep, log, max(50, round(150 / slowness)))
        else:
            raise UnknownNameError("demo route", route, ROUTES)
        log(f"{route}: {time.perf_counter() - t0:.0f}s")
    return done


def _device_line(device: str) -> str:
    from weightzoo.segmenter import resolve_device

    d = resolve_device(device)
    name = torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or platform.machine()
    return f"{d.type} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and np.isnan(x):
        return None
    return x


def results_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: same-site and unseen-site test Dice, HD95, size and time."""
    rows = []
    for task, r in results["tasks"].items():
        unseen = r["dice_unseen_sites"]
        means = [v["mean"] for v in unseen.values() if v["mean"] is not None and not np.isnan(v["mean"])]
        rows.append(
            {
                "task": task,
                f"Dice {results['settings']['train_site']} (same site)": _pm(
                    r["dice_same_site"]["mean"], r["dice_same_site"]["sd"]
                ),
                "Dice unseen": float(np.mean(means)) if means else float("nan"),
                **{f"Dice {k}": v["mean"] for k, v in unseen.items()},
                "HD95 mm": r["hd95_same_site"],
                "train s": round(r["train_seconds"], 1),
                "params": f"{r['n_params'] / 1e3:.0f}k",
            }
        )
    return rows


def _foundation_sections(
    rep: Report,
    ds: RawDataset,
    s: DemoSettings,
    results: dict[str, Any],
    trained: dict[str, TrainResult],
    summaries: dict[str, dict[str, Any]],
    other_sites: list[str],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep.section(
        "Train from scratch",
        f"Synthetic spinal-cord phantoms ({len(ds.cases())} subjects, {len(ds.sites())} sites with different "
        f"contrast, noise, bias field, resolution and field of view). One '{s.preset}' nnU-Net PlainConvUNet per "
        f"task, {s.steps} steps, trained on site {s.train_site}'s training subjects only; evaluated on the held-out "
        f"test subjects of site {s.train_site} and of the unseen sites {', '.join(other_sites)}. "
        "Splits are by subject; the test split was never used for training or selection.",
    )
    rep.table(
        results_table(results),
        caption="Test Dice per task: same site = held-out subjects of the training site (mean ± sd); unseen = other sites' test subjects. HD95 on the same site, in mm (the phantoms' voxel spacing on the 64 px grid).",
    )
    rep.text(
        "Dice is computed per subject volume on the 64 px preprocessed grid; empty reference and empty prediction "
        "give no Dice (excluded from the mean, as nnU-Net does). Lesion is the hardest task: small, and absent in "
        "some subjects.",
        note=True,
    )

    # Example slice per site (what the site shift looks like).
    sites = ds.sites()
    fig, axes = plt.subplots(1, len(sites), figsize=(2.6 * len(sites), 2.8))
    for ax, site in zip(np.atleast_1d(axes), sites, strict=True):
        case = ds.cases_in("test", [site])[0]
        ss = load_slices(
            ds, ["cord"], cases=[case], prep=next(iter(trained.values())).segmenter.preprocessing
        )
        k = len(ss) // 2
        ax.imshow(ss.images[k, 0], cmap="gray")
        ax.set_title(f"site {site}")
        ax.axis("off")
    rep.section("Sites")
    rep.figure(fig, "sites", "One test slice per site: same anatomy, different acquisition.")

    # Loss and validation Dice over training.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for task, res in trained.items():
        hist = [h for h in res.history if "train_loss" in h]
        a1.plot([h["step"] for h in hist], [h["train_loss"] for h in hist], label=task)
        # val Dice is NaN (null) when the val subjects hold no foreground of a task: nothing to plot then
        vh = [h for h in res.history if (h.get("val_dice") or {}).get(task) is not None]
        vh = [h for h in vh if not np.isnan(h["val_dice"][task])]
        a2.plot([h["step"] for h in vh], [h["val_dice"][task] for h in vh], marker="o", label=task)
    a1.set(xlabel="step", ylabel="train loss (Dice + BCE)", title="Training loss")
    a2.set(xlabel="step", ylabel="val Dice (site A val subjects)", title="Validation Dice", ylim=(0, 1))
    a1.legend()
    a2.legend()
    rep.section("Training")
    rep.figure(
        fig,
        "training_curves",
        "Training loss and validation Dice (validation subjects of the training site).",
    )

    # Per-site Dice bars.
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(1, len(trained))
    for i, task in enumerate(trained):
        means = [_stats(summaries[task], task, site)[0] for site in sites]
        ax.bar(np.arange(len(sites)) + i * width, means, width, label=task)
    ax.set_xticks(np.arange(len(sites)) + width * (len(trained) - 1) / 2, [f"site {x}" for x in sites])
    ax.set(ylabel="test Dice", ylim=(0, 1), title=f"Trained on site {s.train_site}")
    ax.legend(ncol=len(trained), fontsize=8)
    rep.section("Site shift")
    rep.figure(
        fig,
        "dice_per_site",
        "Test Dice by site: the drop off the training site is what later routes must close.",
    )

    # Overlays: one test slice per site, ground truth (green) vs prediction (red) for each task.
    rep.section("Overlays")
    for task, res in trained.items():
        rep.figure(
            _overlay_figure(ds, res.segmenter, task, sites),
            f"overlay_{task}",
            f"{task}: reference (green) and prediction (red) on a test slice of each site.",
        )


def _overlay_figure(ds: RawDataset, seg: NetSegmenter, task: str, sites: list[str]) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sites), figsize=(2.6 * len(sites), 2.8))
    for ax, site in zip(np.atleast_1d(axes), sites, strict=True):
        case = ds.cases_in("test", [site])[0]
        ss = load_slices(ds, [task], cases=[case], prep=seg.preprocessing)
        k = int(np.argmax(ss.labels[:, 0].reshape(len(ss), -1).sum(1)))  # slice with most foreground
        prob = seg.predict(ss.images[k])[0]
        ax.imshow(ss.images[k, 0], cmap="gray")
        if ss.labels[k, 0].any():
            ax.contour(ss.labels[k, 0], levels=[0.5], colors="lime", linewidths=1)
        if (prob >= 0.5).any():
            ax.contour(prob, levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"site {site}")
        ax.axis("off")
    return fig
