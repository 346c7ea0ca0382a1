"""The uncertainty part of `weightzoo demo`: the demo's cord model with test-time augmentation (8 flips
and rotations; the demo's models have no dropout, so no MC dropout here) against its single
prediction — calibration, uncertainty–error AUROC, a reliability diagram and one entropy map."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import load_slices
from weightzoo.segmenter import load_model
from weightzoo.uncertainty.evaluate import evaluate_uncertainty
from weightzoo.uncertainty.maps import uncertainty_maps
from weightzoo.uncertainty.report import map_figure, reliability_figure
from weightzoo.uncertainty.sources import TTA


def demo_uncertainty(
    ds: RawDataset, model_dir: str | Path, train_site: str, report: Any, log: Callable[[str], None] = print
) -> dict[str, Any]:
    seg = load_model(model_dir, "cpu")
    task = seg.tasks[0]
    unseen = [s for s in ds.sites() if s != train_site]
    rows, curves = [], {}
    for label, source in (("single prediction", TTA(seg, 1)), ("TTA × 8", TTA(seg, 8))):
        for where, sites in (("training site", [train_site]), ("unseen sites", unseen)):
            res = evaluate_uncertainty(seg, source, ds, "test", sites, [task])
            m = res["mean"][task]
            rows.append({"source": label, "test sites": where, "Dice": m["dice"], "ECE": m["ece"],
                         "ECE boundary band": m["ece_band"], "Brier": m["brier"],
                         "AUROC (entropy vs error)": m["auroc"], "s / slice": res["seconds_per_image"]})  # fmt: skip
            if where == "unseen sites":
                curves[label] = res["reliability"][task]
    log(f"uncertainty: ECE unseen sites, single {rows[1]['ECE']:.4f} vs TTA×8 {rows[3]['ECE']:.4f}")
    report.section(
        "Uncertainty (docs/uncertainty.md)",
        f"The {task} model's single prediction vs the mean of 8 flipped/rotated predictions (TTA), on the "
        "test subjects. Entropy is the uncertainty map; AUROC says how well it finds the error pixels.",
    )
    report.table(rows, caption="calibration and uncertainty quality (means over test cases)")
    report.figure(reliability_figure(curves, f"{task}, unseen sites"), "reliability", "Reliability diagram")
    case = ds.cases_in("test", unseen)[0]
    ss = load_slices(ds, [task], prep=seg.preprocessing, cases=[case])
    i = int(ss.labels[:, 0].reshape(len(ss), -1).sum(1).argmax())
    maps = uncertainty_maps(TTA(seg, 8).samples(ss.images[i : i + 1]))
    fig = map_figure(
        ss.images[i, 0], {k: maps[k][0, 0].numpy() for k in ("mean", "entropy", "mi")}, ss.labels[i, 0]
    )
    report.figure(
        fig, "uncertainty_map", f"{case} (site {ds.site(case)}, never seen): TTA maps; cyan: reference"
    )
    return {"rows": rows}
