"""Markdown tables of a `benchmarks/delta_real.sh` run: W/eval/summary.json (+ W/labelled_*.txt).

    python benchmarks/delta_real_tables.py WORK_DIR

Seen sites: test Dice of every route (± = sd over the generators). Unseen sites: the base, the
labelled 100-step fine-tune (5 seeds), the generated networks, and the recovery of the labelled gain:
(generated − base) / (labelled − base).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def fmt(v: float | list[float]) -> str:
    if isinstance(v, list):
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
    return f"{v:.3f}"


def labelled(work: Path) -> dict[tuple[str, str], list[float]]:
    """{(task, site): test Dice per seed} from finetune_site.py's printed lines."""
    out = {}
    line = re.compile(r"^(\S+)@(\S+): base \+ \d+ steps, test Dice .* \(([-0-9., ]+)\)$")
    for f in sorted(work.glob("labelled_*.txt")):
        for text in f.read_text().splitlines():
            if m := line.match(text.strip()):
                out[(m.group(1), m.group(2))] = [float(x) for x in m.group(3).split(",")]
    return out


def main() -> None:
    work = Path(sys.argv[1])
    res = json.loads((work / "eval" / "summary.json").read_text())
    seen_cols = [
        "base",
        "zoo best (val)",
        "uniform soup",
        "greedy soup",
        "generated one-shot",
        "generated best-of-8 (val)",
        "noisy nearest",
    ]
    print("| task | site | " + " | ".join(seen_cols) + " |")
    print("|---|---|" + "---|" * len(seen_cols))
    for row in res["seen"]:
        print(f"| {row['task']} | {row['site']} | " + " | ".join(fmt(row[c]) for c in seen_cols) + " |")
    lab = labelled(work)
    print()
    print(
        "| task | unseen site | base | base + 100 steps with labels | generated (8 unlabelled images) "
        "| generated (site unknown) | recovery |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in res["unseen"]:
        ref = lab.get((row["task"], row["site"]))
        gen = row["generated (8 unlabelled images)"]
        rec = "–"
        if ref:
            gain = statistics.mean(ref) - row["base"]
            rec = f"{100 * (statistics.mean(gen) - row['base']) / gain:.0f} %" if gain > 0 else "no gain"
        print(
            f"| {row['task']} | {row['site']} | {fmt(row['base'])} | {fmt(ref) if ref else '–'} | "
            f"{fmt(gen)} | {fmt(row['generated (site unknown)'])} | {rec} |"
        )


if __name__ == "__main__":
    main()
