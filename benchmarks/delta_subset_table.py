"""Markdown table of a `benchmarks/delta_subset.sh` run: norm+seg vs all-weights generators.

    python benchmarks/delta_subset_table.py WORK_DIR

Means over the task × site cells of W/eval_<subset>/summary.json; generated and noisy-nearest columns
are the mean over cells per generator, then mean ± sd over the generators.
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path


def cell_mean(rows: list[dict], key: str) -> float:
    return st.mean(st.mean(r[key]) if isinstance(r[key], list) else r[key] for r in rows)


def over_generators(rows: list[dict], key: str) -> str:
    per = [st.mean(r[key][i] for r in rows) for i in range(len(rows[0][key]))]
    return f"{st.mean(per):.3f} ± {st.stdev(per):.3f}"


def main() -> None:
    work = Path(sys.argv[1])
    print("| generator learns | cells | zoo best (val) | base | uniform soup | greedy soup | generated one-shot "
          "| generated best-of-8 (val) | noisy nearest | one-shot within 1 pt of zoo best |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sub in ("norm_seg", "all"):
        rows = json.loads((work / f"eval_{sub}" / "summary.json").read_text())["seen"]

        within = sum(st.mean(r["generated one-shot"]) >= r["zoo best (val)"] - 0.01 for r in rows)
        cols = [cell_mean(rows, k) for k in ("zoo best (val)", "base", "uniform soup", "greedy soup")]
        gen = [
            over_generators(rows, k)
            for k in ("generated one-shot", "generated best-of-8 (val)", "noisy nearest")
        ]
        print(f"| {sub} | {len(rows)} | " + " | ".join(f"{c:.3f}" for c in cols) + " | " + " | ".join(gen)
              + f" | {within} of {len(rows)} |")  # fmt: skip


if __name__ == "__main__":
    main()
