"""The prune bench's figure (Dice vs compression, Dice vs measured speedup), table and HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightzoo.evaluate.report import Report

TABLE_KEYS = (
    ("method", "method"),
    ("target", "target"),
    ("seeds", "seeds"),
    ("compression", "compression"),
    ("theoretical_speedup", "theoretical speedup"),
    ("measured_speedup", "measured speedup"),
    ("dice_before_finetune", "Dice before fine-tune"),
    ("dice", "Dice"),
    ("hd95", "HD95"),
)


def table_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """Rows 'mean ± sd' over seeds, the unpruned network first."""
    ref = results["unpruned"]
    rows = [
        {
            "method": "unpruned",
            "target": "–",
            "seeds": "–",
            "compression": "1.00",
            "theoretical speedup": "1.00",
            "measured speedup": "1.00",
            "Dice before fine-tune": f"{ref['dice']:.3f}",
            "Dice": f"{ref['dice']:.3f}",
            "HD95": f"{ref['hd95']:.2f}",
        }
    ]
    for r in results["rows"]:
        row = {}
        for key, label in TABLE_KEYS:
            v = r[key]
            if key in ("method", "seeds"):
                row[label] = str(v)
            elif key == "target":
                row[label] = f"{v:g}"
            else:
                digits = 2 if key in ("hd95", "compression") or "speedup" in key else 3
                row[label] = f"{v:.{digits}f} ± {r[key + '_sd']:.{digits}f}"
        rows.append(row)
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    rows = table_rows(results)
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def curves_figure(results: dict[str, Any]) -> Any:
    """Two panels: Dice vs compression (masking methods) and Dice vs measured CPU speedup (all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_c, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    ref = results["unpruned"]["dice"]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results["rows"]:
        by_method.setdefault(r["method"], []).append(r)
    for method, rows in sorted(by_method.items()):
        rows = sorted(rows, key=lambda r: r["target"])
        dice = [r["dice"] for r in rows]
        err = [r["dice_sd"] for r in rows]
        style = {"linestyle": "--"} if "random" in method else {}
        if method.startswith("channels"):
            ax_s.errorbar(
                [r["measured_speedup"] for r in rows], dice, yerr=err, marker="s", label=method, **style
            )
        else:
            ax_c.errorbar([r["compression"] for r in rows], dice, yerr=err, marker="o", label=method, **style)
            ax_s.errorbar(
                [r["measured_speedup"] for r in rows],
                dice,
                yerr=err,
                marker="o",
                label=method,
                alpha=0.4,
                **style,
            )
    for ax, xlabel in ((ax_c, "compression (all / nonzero parameters)"), (ax_s, "measured CPU speedup")):
        ax.axhline(ref, color="k", lw=1, label="unpruned")
        ax.axhline(ref - 0.01, color="k", lw=0.5, ls=":", label="unpruned − 1 point")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test Dice (mean over tasks, ± sd over seeds)")
    ax_c.set_xscale("log", base=2)
    ax_c.legend(fontsize=7)
    ax_s.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_report(results: dict[str, Any], out: str | Path) -> Path:
    rep = Report(out, "weightzoo prune bench")
    rec = results["recipe"]
    rep.section(
        "Pruning, measured the ShrinkBench way",
        f"Model {results['model']}; every method gets the same fine-tuning budget "
        f"({rec['finetune_steps']} steps, {rec['optimizer']} lr {rec['lr']}, batch {rec['batch_size']}). "
        "Dice on the test split; latency of a batch on this machine's CPU.",
    )
    rep.table(table_rows(results), caption="mean ± sd over seeds")
    rep.figure(curves_figure(results), "prune_curves", caption="Dice vs compression and vs measured speedup")
    return rep.write()
