"""The pruning part of `weightzoo demo`: the demo's cord model masked to 8× compression and slimmed to
2× fewer FLOPs, each fine-tuned briefly, next to the unpruned model (table + curves in the report)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import load_slices
from weightzoo.evaluate.summary import evaluate_segmenter
from weightzoo.prune.model import PruneRecipe, prune_and_finetune
from weightzoo.segmenter import load_model

# the first is the control: nothing removed, the same fine-tuning (the demo's models are short-trained,
# so extra steps alone can raise Dice: a pruned model is compared with this row, not only with the first)
DEMO_RECIPES = (
    ("global-magnitude", {"ratio": 1.0}),
    ("global-magnitude", {"ratio": 8.0}),
    ("channels", {"speedup": 2.0}),
)


def demo_prune(
    out_dir: str | Path,
    ds: RawDataset,
    model_dir: str | Path,
    site: str,
    report: Any,
    log: Callable[[str], None] = print,
    finetune_steps: int = 30,
) -> dict[str, Any]:
    """Prune the model at `model_dir` two ways; test Dice at `site` (the model's training site)."""
    out_dir = Path(out_dir) / "prune"
    seg = load_model(model_dir, "cpu")
    cases = {sp: ds.cases_in(sp, [site]) for sp in ("train", "val")}
    train = load_slices(ds, seg.tasks, prep=seg.preprocessing, cases=cases["train"])
    val = load_slices(ds, seg.tasks, prep=seg.preprocessing, cases=cases["val"]) if cases["val"] else None

    def dice(model: Any) -> float:
        summ = evaluate_segmenter(model, ds, split="test", sites=[site])
        return float(summ["mean"][seg.tasks[0]]["Dice"])

    rows = [{"model": "unpruned", "parameters (nonzero)": seg.n_params, "compression": 1.0,
             "theoretical speedup": 1.0, "measured CPU speedup": 1.0, "test Dice": dice(seg), "seconds": 0.0}]  # fmt: skip
    for method, target in DEMO_RECIPES:
        t0 = time.perf_counter()
        recipe = PruneRecipe(method, finetune_steps=finetune_steps, batch_size=12, **target)
        name = "unpruned" if target.get("ratio") == 1.0 else method
        pruned, info = prune_and_finetune(seg, recipe, out_dir / name, train, val, "cpu", progress=False)
        p = info["pruned"]
        rows.append(
            {
                "model": f"{name} + {finetune_steps} steps"
                if name == "unpruned"
                else f"{method} ({', '.join(f'{k} {v:g}' for k, v in target.items())}) + {finetune_steps} steps",
                "parameters (nonzero)": p["nonzero_size"],
                "compression": p["compression"],
                "theoretical speedup": p["theoretical_speedup"],
                "measured CPU speedup": p["measured_speedup"],
                "test Dice": dice(pruned),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        log(
            f"prune {rows[-1]['model']}: test Dice {rows[-1]['test Dice']:.3f} (unpruned {rows[0]['test Dice']:.3f})"
        )
    report.section(
        "Pruning (docs/prune.md)",
        f"The {seg.tasks[0]} model, masked to 8× compression (global magnitude) and slimmed to ½ the "
        f"FLOPs (whole channels removed: still a PlainConvUNet), each fine-tuned {finetune_steps} steps. "
        "Compare each with 'unpruned + the same steps'. Masks compress but do not speed up; removed "
        "channels do. The full study is "
        "`weightzoo prune bench` (seeds, all methods, curves).",
    )
    report.table(rows, caption=f"test subjects of site {site}")
    return {"rows": rows}
