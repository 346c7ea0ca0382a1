"""Summaries, goal checks, tables and the HTML report of an in-context held-out evaluation.

`summarize` averages each support size S over the REAL held-out tasks evaluated at it (phantoms never
enter) and checks the issue's goals against paired task sets; `results_markdown` and `report` turn a
`run_evaluation` result into markdown and a static HTML report with the Dice-vs-S figure, beside
UniverSeg's published curve (the anchor below).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weightzoo.incontext.heldout import REAL_TASKS

# Published anchor: UniverSeg's mean Dice over its held-out tasks vs support size (single prediction),
# and with support-set ensembling at S = 64. Blank (None) where not published.
UNIVERSEG_CITATION = (
    "Butoi, Ortiz, Ma, Sabuncu, Guttag, Dalca: UniverSeg: Universal Medical Image Segmentation, "
    "ICCV 2023 (held-out Dice vs support size)"
)
UNIVERSEG_SINGLE = {1: 0.53, 4: 0.63, 16: 0.70, 64: 0.71}
UNIVERSEG_ENSEMBLE = {64: 0.717}
GOAL_S16, GOAL_MARGIN = 0.70, 0.15


def nanmean(vals: Sequence[float]) -> float:
    """Mean of the values that are not None/NaN; NaN when there are none."""
    v = [x for x in vals if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


# ---- summary over real tasks, goal checks ------------------------------------------------------------
MEAN_KEYS = (
    "single",
    "ensemble",
    "ensemble-subsets",
    "mean-of-support",
    "single-baseline",
    "best-candidate",
    "GED",
    "nnunet",
)


def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of all tasks -> (mean rows: per S the mean over the REAL tasks evaluated at that S, with the
    UniverSeg anchor and the paired change of single from the previous S; goal checks: goal, ok
    (True/False/None = not evaluated), detail)."""
    real = [r for r in rows if r["task"] in REAL_TASKS]
    sizes = sorted({r["S"] for r in real})
    by = {(r["task"], r["S"]): r for r in real}
    means: list[dict[str, Any]] = []
    for i, s in enumerate(sizes):
        rs = [r for r in real if r["S"] == s]
        m: dict[str, Any] = {"S": s, "tasks": len(rs)}
        m.update({k: nanmean([r.get(k, math.nan) for r in rs]) for k in MEAN_KEYS})
        if i > 0:  # paired over the tasks evaluated at both sizes: task mix changes do not count
            prev = sizes[i - 1]
            diffs = [r["single"] - by[(r["task"], prev)]["single"] for r in rs if (r["task"], prev) in by]
            m["paired-change"] = nanmean(diffs)
            m["paired-tasks"] = len(diffs)
        m["UniverSeg"] = UNIVERSEG_SINGLE.get(s)
        m["UniverSeg-ensemble"] = UNIVERSEG_ENSEMBLE.get(s)
        means.append(m)
    return means, _checks(means, real)


def _checks(means: list[dict[str, Any]], real: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at = {m["S"]: m for m in means}
    checks = []
    m16 = at.get(16)
    checks.append(
        {
            "goal": f"mean single >= {GOAL_S16:.2f} at S = 16",
            "ok": None if m16 is None else bool(m16["single"] >= GOAL_S16),
            "detail": "S = 16 not evaluated"
            if m16 is None
            else f"{m16['single']:.3f} over {m16['tasks']} tasks",
        }
    )
    big = [m for m in means if m["S"] >= 4]
    low = [m for m in big if not m["single-baseline"] >= GOAL_MARGIN]
    detail = "; ".join(f"S = {m['S']}: {m['single-baseline']:+.3f}" for m in (low or big))
    margins: dict[str, list[float]] = defaultdict(list)
    for r in real:
        if r["S"] >= 4:
            margins[r["task"]].append(r["single-baseline"])
    low_tasks = {t: min(v) for t, v in margins.items() if not min(v) >= GOAL_MARGIN}
    if low_tasks:
        detail += " | tasks below it at some S (min margin): " + ", ".join(
            f"{t} {v:+.3f}" for t, v in sorted(low_tasks.items())
        )
    checks.append(
        {
            "goal": f"mean single >= mean-of-support + {GOAL_MARGIN:.2f} at every S >= 4",
            "ok": None if not big else not low,
            "detail": detail or "no S >= 4 evaluated",
        }
    )
    steps = [m for m in means if "paired-change" in m]
    falls = [m for m in steps if m["paired-change"] < 0]
    prev = {m["S"]: p["S"] for p, m in itertools.pairwise(means)}
    checks.append(
        {
            "goal": "mean single never falls as S grows (paired over tasks evaluated at both S)",
            "ok": None if not steps else not falls,
            "detail": "; ".join(
                f"falls S = {prev[m['S']]} -> {m['S']} by {-m['paired-change']:.3f} ({m['paired-tasks']} tasks)"
                for m in falls
            )
            or ("non-decreasing" if steps else "fewer than two S evaluated"),
        }
    )
    return checks


# ---- tables -------------------------------------------------------------------------------------------
TASK_COLS = ("S", *MEAN_KEYS, "UniverSeg")
MEAN_COLS = (
    "S",
    "tasks",
    "single",
    "ensemble",
    "ensemble-subsets",
    "mean-of-support",
    "single-baseline",
    "paired-change",
    "best-candidate",
    "GED",
    "nnunet",
    "UniverSeg",
    "UniverSeg-ensemble",
)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    """Rows -> a GitHub markdown table of the given columns (missing values: blank)."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _with_anchor(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "UniverSeg": UNIVERSEG_SINGLE.get(r["S"])} for r in rows]


def _cols(rows: list[dict[str, Any]], cols: Sequence[str]) -> list[str]:
    """Drop the method columns nobody filled (e.g. nnunet when it was not asked for)."""
    always = {"S", "tasks", "single", "mean-of-support", "single-baseline", "UniverSeg", "UniverSeg-ensemble"}
    return [c for c in cols if c in always or any(_fmt(r.get(c)) for r in rows)]


def checks_markdown(checks: list[dict[str, Any]]) -> str:
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    return "\n".join(f"- **{mark[c['ok']]}** {c['goal']}: {c['detail']}" for c in checks)


def results_markdown(result: dict[str, Any]) -> str:
    """The markdown report of one run: a table per task, the mean over real tasks, the goal checks."""
    e = result["env"]
    lines = [
        f"# In-context held-out evaluation: {result['model']}",
        "",
        f"{e['date']} · {e['device']} · torch {e['torch']} · {result['n_params']:,} parameters · "
        f"grid {result['size']} px · {result['seconds']} s",
        "",
        "Dice on the model grid; `single-baseline` = single − mean-of-support; UniverSeg = published mean "
        "held-out Dice (blank where not published).",
    ]
    for info in result["task_info"]:
        rs = [r for r in result["rows"] if r["task"] == info["name"]]
        skip = f"; skipped S = {', '.join(map(str, info['skipped_sizes']))}" if info["skipped_sizes"] else ""
        kind = "real" if info["real"] else "not real: excluded from the mean"
        lines += [
            "",
            f"### {info['name']} ({kind})",
            "",
            f"{info['source']}: {info['images']} images in {info['groups']} groups; {info['queries']} queries, "
            f"support pool {info['pool']}{skip}"
            + (
                f"; observer 2 vs 1 Dice on the queries {info['rater_dice']:.3f}"
                if info.get("rater_dice")
                else ""
            ),
            "",
            markdown_table(_with_anchor(rs), _cols(rs, TASK_COLS)),
        ]
    means = result["mean_rows"]
    lines += [
        "",
        "### MEAN over real held-out tasks",
        "",
        "`tasks` = real tasks evaluated at that S (larger S: fewer tasks); `paired-change` = mean change of "
        "single from the previous S over the tasks evaluated at both.",
        "",
        markdown_table(means, _cols(means, MEAN_COLS)),
        "",
        f"UniverSeg: {UNIVERSEG_CITATION}.",
        "",
        "### Goals",
        "",
        checks_markdown(result["checks"]),
        "",
    ]
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------------------


def jsonable(x: Any) -> Any:
    """Dicts/lists with NaN -> None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


CURVE_STYLES = {
    "single": "o-",
    "ensemble": "s--",
    "mean-of-support": "x:",
    "best-candidate": "^",
    "nnunet": "d",
}


def plot_curves(result: dict[str, Any]) -> Any:
    """Dice vs S (log2 axis): one panel per task and one for the mean over real tasks with the
    UniverSeg anchor. -> a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, means = result["rows"], result["mean_rows"]
    names = [i["name"] for i in result["task_info"]]
    panels = [(n, [r for r in rows if r["task"] == n]) for n in names] + [("MEAN (real tasks)", means)]
    cols = min(4, len(panels))
    nrow = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.3 * cols, 2.9 * nrow), squeeze=False)
    for ax, (title, rs) in zip(axes.flat, panels, strict=False):
        for key, style in CURVE_STYLES.items():
            pts = [(r["S"], r[key]) for r in rs if isinstance(r.get(key), float) and not math.isnan(r[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=key, ms=4)
        if rs is means:
            ax.plot(list(UNIVERSEG_SINGLE), list(UNIVERSEG_SINGLE.values()), "k*-", label="UniverSeg", ms=7)
            ax.plot(list(UNIVERSEG_ENSEMBLE), list(UNIVERSEG_ENSEMBLE.values()), "kP", label="UniverSeg ens.")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["S"] for r in rs} | (set(UNIVERSEG_SINGLE) if rs is means else set()))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set(title=title, xlabel="support size S", ylim=(0, 1))
        ax.title.set_fontsize(9)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("Dice")
    axes.flat[len(panels) - 1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def report(out: Path, result: dict[str, Any]) -> Path:
    """Write out/report.html (tables, goal checks, the Dice-vs-S figure) -> its path."""
    from weightzoo.evaluate.report import Report

    rep = Report(out, "weightzoo in-context evaluation (held-out tasks)")
    e = result["env"]
    rep.section(
        "Held-out tasks",
        "Tasks never used in training. Dice per support size S (mean over seeded support draws and queries); "
        "mean-of-support = the mean of the S support masks thresholded at 0.5 (a trivial baseline); "
        "ensemble = average of independent draws (UniverSeg); best-candidate and GED on the first draw.",
    )
    rep.table(
        [{"task": r["task"], **{c: r.get(c) for c in TASK_COLS if c != "UniverSeg"}} for r in result["rows"]],
        caption="Dice vs support size, per task",
    )
    rep.table(
        [{c: m.get(c) for c in MEAN_COLS} for m in result["mean_rows"]],
        caption="Mean over real held-out tasks (UniverSeg: published, blank where not published)",
    )
    for c in result["checks"]:
        rep.text(
            f"{ {True: 'PASS', False: 'FAIL', None: 'n/a'}[c['ok']] }: {c['goal']}: {c['detail']}", note=True
        )
    if result["rows"]:
        rep.figure(plot_curves(result), "dice_vs_support", "Held-out Dice vs support size S (log2 axis).")
    skipped = [
        f"{i['name']}: {i['skipped_sizes']} (pool {i['pool']})"
        for i in result["task_info"]
        if i["skipped_sizes"]
    ]
    if skipped:
        rep.text("S larger than the support pool, skipped: " + "; ".join(skipped), note=True)
    rep.text(f"UniverSeg anchor: {UNIVERSEG_CITATION}.")
    return rep.write(
        meta=f"model {result['model']} · {result['n_params']:,} parameters · {e['device']} · torch {e['torch']} · "
        f"{e['date']} · {result['seconds']} s"
    )
