"""Site heads on a shared backbone vs one universal model: per-site test Dice over seeds, the cost of a
head, and a few-shot curve for a site left out of backbone training.

Per data set, site and task, the test-subject Dice (mean over test subjects, then mean ± sd over
seeds) of: the universal model (backbone + universal head, all sites, site-balanced sampling); site
heads with n = 0, 1, 2 decoder stages (backbone frozen, initialised from the universal head); a
specialist trained from scratch on that site alone (same recipe and steps as the universal model); and
a FiLM site-conditioned single model (same steps); and a site hypernetwork (weightzoo.hyper, MIP, one-hot
site code -> every weight of the network, same steps). Nothing is selected on test data: every model is
its last iterate; validation subjects are not used at all. Few-shot curve: a backbone trained without
the new site, then heads (n = 1, 2) from k labelled TRAIN subjects of the new site, scored on its TEST
subjects; k = 0 is that backbone's universal head.

Network: the `tiny` preset (3 stages, [4, 8, 16] features, ~3.7 k parameters) at 64 x 64 px, Adam lr
1e-2, poly schedule, batch 8, nnU-Net augmentation: the nnU-Net SGD recipe does not converge in a
few hundred steps at this size, so the recipe is the same for every method but not nnU-Net's optimiser.
torch runs with ONE thread: on a shared 2-core machine, two intra-op threads spin against the other
processes and a step becomes 20-40x slower. Training times are CPU seconds of this process
(`time.process_time`, one thread), so ratios hold even when other jobs share the machine.

    python benchmarks/site_heads.py                 # full: phantoms + WBC + SCT sanity, 3 seeds
    python benchmarks/site_heads.py --quick         # 1 seed, small phantoms only (~3 min)
    python benchmarks/site_heads.py --data phantom --seeds 0 1 2 --steps 250 --out runs/bench_heads
    python benchmarks/site_heads.py --data phantom --preset small --steps 500 --no-curve   # a realistic size
    python benchmarks/site_heads.py --data wbc,axon,nuclei --no-curve                     # real multi-site data
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.raw import RawDataset, RawDatasetWriter
from weightzoo.data.slices import Preprocessing, SliceSet, load_slices
from weightzoo.evaluate.summary import evaluate_slices
from weightzoo.heads.film import FiLMSegmenter, train_film
from weightzoo.heads.model import UNIVERSAL, HeadedModel
from weightzoo.heads.segmenter import HeadedSegmenter
from weightzoo.heads.train import pick_subjects, train_backbone, train_site_head
from weightzoo.hyper import HyperConfig, train_hyper_on_slices
from weightzoo.nets.unet import ArchSpec, count_parameters
from weightzoo.segmenter import NetSegmenter, Segmenter
from weightzoo.train.config import TrainConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HEAD_NS = (0, 1, 2)
CURVE_HEAD_NS = (1, 2)
METHODS = ("universal", "heads n=0", "heads n=1", "heads n=2", "specialist", "FiLM", "hyper")


@dataclass
class Bench:
    name: str
    ds: RawDataset
    tasks: list[str]
    prep: Preprocessing
    seeds: list[int]
    new_site: str | None = None  # left out of the curve's backbone
    ks: list[int] = field(default_factory=list)
    note: str = ""


# ---- data -------------------------------------------------------------------------------------------
def phantom_bench(tmp: Path, quick: bool, seeds: list[int]) -> Bench:
    from weightzoo.data.synth import make_phantom_dataset

    # 34 subjects per site -> 20 train / 7 val / 7 test: enough train subjects for k = 20
    n = 14 if quick else 34
    ds = make_phantom_dataset(tmp, sites=4, subjects_per_site=n, size=64, n_slices=8, seed=0)
    ks = [1, 2, 5] if quick else [1, 2, 5, 10, 20]
    return Bench("phantoms", ds, ["cord", "gm"], Preprocessing("zscore", (64, 64), 2, 1), seeds, "D", ks)


def wbc_bench(tmp: Path, quick: bool, seeds: list[int]) -> Bench | None:
    src = SHARED / "wbc"
    if not src.is_dir():
        print(f"WBC skipped: {src} not found")
        return None
    from weightzoo.data.importers import import_wbc

    ds = import_wbc(src, tmp, size=64, limit=40 if quick else 100)
    ks = [1, 2, 5] if quick else [1, 2, 5, 10, 20]
    note = "100 images per source (first 100 of Dataset 1, all of Dataset 2), 64 px; one image = one subject"
    return Bench(
        "WBC", ds, ["nucleus", "cell"], Preprocessing("rgb", (64, 64), 2, 3), seeds, "Dataset2", ks, note
    )


SCT_CONTRASTS = {  # site: (image, cord mask) under sct_testing_data/
    "t1": ("t1/t1w.nii.gz", "t1/t1w_seg-manual.nii.gz"),
    "t2": ("t2/t2.nii.gz", "t2/t2_seg-manual.nii.gz"),
    "t2s": ("t2s/t2s.nii.gz", "t2s/t2s_seg.nii.gz"),
}


def sct_bench(tmp: Path, quick: bool, seeds: list[int]) -> Bench | None:
    """Each SCT contrast is a 'site'; its one volume is cut into axial slabs that act as subjects.
    One healthy subject in all contrasts: a sanity check of the code path, not evidence."""
    src = SHARED / "sct_testing_data"
    if not src.is_dir():
        print(f"SCT skipped: {src} not found")
        return None
    from weightzoo.data.io import read_image, read_mask

    w = RawDatasetWriter(tmp, 990, "SCTSlabs", {"0": "MRI"}, {"background": 0, "cord": 1}, ".nii.gz")
    for site, (img_rel, seg_rel) in SCT_CONTRASTS.items():
        img = read_image(src / img_rel)
        mask = read_mask(src / seg_rel, like=img)
        z = img.array.shape[-1]
        slab = max(1, z // 6)
        for i, z0 in enumerate(range(0, z - slab + 1, slab)):
            shift = np.eye(4)
            shift[2, 3] = z0
            w.add_case(
                f"{site}_{i:02d}",
                [img.array[0, :, :, z0 : z0 + slab]],
                mask[:, :, z0 : z0 + slab],
                site=site,
                subject=f"{site}-slab{i:02d}",
                affine=img.affine @ shift,
            )
    ds = w.finish()
    note = "one subject: each contrast's volume cut into ~6-9 axial slabs = 'subjects' (sanity check only)"
    return Bench(
        "SCT contrasts",
        ds,
        ["cord"],
        Preprocessing("zscore", (64, 64), 2, 1),
        seeds[:1] if quick else seeds,
        None,
        [],
        note,
    )


def axon_bench(tmp: Path, quick: bool, seeds: list[int]) -> Bench | None:
    """AxonDeepSeg: SEM (rat spinal cord) vs TEM (mouse corpus callosum), tasks axon and myelin."""
    srcs = [SHARED / "axondeepseg_sem", SHARED / "axondeepseg_tem"]
    if not all(s.is_dir() for s in srcs):
        print(f"axon SEM/TEM skipped: {srcs} not found")
        return None
    from weightzoo.data.import_microscopy import import_axondeepseg

    ds = import_axondeepseg(srcs, tmp, tile=256, size=64)
    note = "AxonDeepSeg SEM (10 images, 8 rats) and TEM (21 images, 10 mice): 256 px crops resized to 64 px; subject = animal"
    return Bench(
        "Axon EM", ds, ["axon", "myelin"], Preprocessing("zscore", (64, 64), 2, 1), seeds, None, [], note
    )


def nuclei_bench(tmp: Path, quick: bool, seeds: list[int]) -> Bench | None:
    """DSB 2018 nuclei: each acquisition type (modality and image size) is a site."""
    src = SHARED / "dsb2018_nuclei"
    if not src.is_dir():
        print(f"nuclei skipped: {src} not found")
        return None
    from weightzoo.data.import_microscopy import import_dsb2018

    ds = import_dsb2018(src, tmp, tile=256, size=64, per_site=20 if quick else 60)
    note = "DSB 2018 nuclei, sites = acquisition types; first 60 images per type, 256 px crops resized to 64 px; subject = image"
    return Bench(
        "Nuclei (DSB)",
        ds,
        ["nucleus"],
        Preprocessing("rgb", (64, 64), 2, ds.n_channels),
        seeds,
        None,
        [],
        note,
    )


# ---- one bench --------------------------------------------------------------------------------------
def dice_of(seg: Segmenter, test: SliceSet, tasks: list[str]) -> dict[str, float]:
    """Mean test-subject Dice per task (per-case Dice on the stacked slices; NaN cases left out)."""
    summ = evaluate_slices(seg, test, tasks=tasks)
    return {t: float(summ["mean"][t]["Dice"]) for t in tasks}


def run_bench(
    b: Bench,
    steps: int,
    head_steps: int,
    log: Callable[[str], None],
    preset: str = "tiny",
    curve_on: bool = True,
) -> dict[str, Any]:
    tr = load_slices(b.ds, b.tasks, "train", prep=b.prep)
    te = load_slices(b.ds, b.tasks, "test", prep=b.prep)
    sites = tr.sites()
    dice: dict[str, dict[str, dict[str, list[float]]]] = {
        m: {s: {t: [] for t in b.tasks} for s in sites} for m in METHODS
    }
    seconds: dict[str, list[float]] = {
        k: [] for k in ("backbone", "specialist", "FiLM", "hyper", *(f"head n={n}" for n in HEAD_NS))
    }
    params: dict[str, int] = {}
    curve: dict[str, dict[str, list[float]]] = {}
    t_bench = time.perf_counter()
    for seed in b.seeds:
        cfg = TrainConfig(
            tasks=b.tasks, preset=preset, optimizer="adam", lr=1e-2, steps=steps, batch_size=8,
            size=b.prep.size, normalization=b.prep.normalization, seed=seed, device="cpu",
            val_every=steps, checkpoint_every=steps,
        )  # fmt: skip
        hcfg = dataclasses.replace(cfg, steps=head_steps)
        (hm, res), cpu = cpu_timed(train_backbone, tr, None, cfg, 0)
        seconds["backbone"].append(cpu)
        params["network"] = count_parameters(hm.network())
        for s in sites:
            record(dice["universal"][s], dice_of(HeadedSegmenter(hm, None), te.where(site=s), b.tasks))
        log(f"{b.name} seed {seed}: universal {res.seconds:.0f}s wall, {cpu:.0f}s CPU")
        for n in HEAD_NS:
            hn = HeadedModel.from_network(hm.network(), hm.spec, b.tasks, b.prep, n)
            params[f"head n={n}"] = hn.head_n_params(UNIVERSAL)
            for s in sites:
                (state, _, _), cpu = cpu_timed(train_site_head, hn, tr.where(site=s), None, hcfg, s)
                hn.set_head(s, state)
                seconds[f"head n={n}"].append(cpu)
                record(dice[f"heads n={n}"][s], dice_of(HeadedSegmenter(hn, s), te.where(site=s), b.tasks))
        log(f"{b.name} seed {seed}: heads done")
        for s in sites:
            (spec_hm, _), cpu = cpu_timed(train_backbone, tr.where(site=s), None, cfg, 0)
            seconds["specialist"].append(cpu)
            record(dice["specialist"][s], dice_of(HeadedSegmenter(spec_hm, None), te.where(site=s), b.tasks))
        log(f"{b.name} seed {seed}: specialists done")
        (film, r), cpu = cpu_timed(train_film, tr, None, cfg)
        seconds["FiLM"].append(cpu)
        spec = ArchSpec.preset(preset, b.prep.channels, len(b.tasks))
        params["FiLM per site"] = film.n_params_per_site()
        for s in sites:
            record(
                dice["FiLM"][s],
                dice_of(FiLMSegmenter(film, spec, b.tasks, b.prep, s), te.where(site=s), b.tasks),
            )
        log(f"{b.name} seed {seed}: FiLM {r.seconds:.0f}s")
        (hyper, r), cpu = cpu_timed(
            train_hyper_on_slices, tr, None, cfg, HyperConfig(condition="site", sites=sites)
        )
        seconds["hyper"].append(cpu)
        params["hyper"] = hyper.hyper.n_hyper_params()
        for s in sites:
            net = hyper.sample_network(hyper.site_index(s))
            seg = NetSegmenter(net, spec, b.tasks, b.prep)
            record(dice["hyper"][s], dice_of(seg, te.where(site=s), b.tasks))
        log(f"{b.name} seed {seed}: site hypernetwork {r.seconds:.0f}s")
        if b.new_site and curve_on:
            run_curve(b, tr, te, cfg, hcfg, seed, curve)
            log(f"{b.name} seed {seed}: few-shot curve done ({time.perf_counter() - t_bench:.0f}s so far)")
    return {
        "name": b.name,
        "dataset": b.ds.name,
        "tasks": b.tasks,
        "sites": sites,
        "seeds": b.seeds,
        "preset": preset,
        "steps": steps,
        "head_steps": head_steps,
        "n_test_subjects": {s: len({m["subject"] for m in te.where(site=s).meta}) for s in sites},
        "n_train_subjects": {s: len({m["subject"] for m in tr.where(site=s).meta}) for s in sites},
        "dice": dice,
        "seconds": seconds,
        "params": params,
        "curve": curve,
        "new_site": b.new_site,
        "note": b.note,
        "seconds_total": round(time.perf_counter() - t_bench, 1),
    }


def run_curve(
    b: Bench, tr: SliceSet, te: SliceSet, cfg: TrainConfig, hcfg: TrainConfig, seed: int, curve: dict
) -> None:
    """Backbone without the new site; heads (n = 1 and 2) from k of its train subjects; Dice on its test
    subjects. curve["k=0"]: that backbone's universal head; curve[f"n={n}"][str(k)]: the heads."""
    new = b.new_site
    assert new is not None
    others = tr.select([i for i, m in enumerate(tr.meta) if m["site"] != new])
    hm, _ = train_backbone(others, None, cfg, 0)
    test_new = te.where(site=new)
    record(
        curve.setdefault("k=0", {t: [] for t in b.tasks}),
        dice_of(HeadedSegmenter(hm, None), test_new, b.tasks),
    )
    for n in CURVE_HEAD_NS:
        hn = HeadedModel.from_network(hm.network(), hm.spec, b.tasks, b.prep, n)
        for k in b.ks:
            subjects = set(pick_subjects(b.ds, new, k, seed))
            shots = tr.select(
                [i for i, m in enumerate(tr.meta) if m["site"] == new and m["subject"] in subjects]
            )
            state, _, _ = train_site_head(hn, shots, None, hcfg, new)
            hn.set_head(new, state)
            into = curve.setdefault(f"n={n}", {}).setdefault(str(k), {t: [] for t in b.tasks})
            record(into, dice_of(HeadedSegmenter(hn, new), test_new, b.tasks))


def cpu_timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """(fn(*args), CPU seconds of this process): with one torch thread, the compute a training took, far
    less sensitive than wall time to the other jobs on a shared machine."""
    t = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t


def record(into: dict[str, list[float]], values: dict[str, float]) -> None:
    for t, v in values.items():
        into[t].append(v)


# ---- tables -----------------------------------------------------------------------------------------
def ms(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    return (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)


def pm(values: list[float]) -> str:
    m, s = ms(values)
    return "–" if math.isnan(m) else f"{m:.3f} ± {s:.3f}"


def site_mean(r: dict[str, Any], method: str, task: str) -> list[float]:
    """Per-seed mean over sites (one value per seed)."""
    per_site = [r["dice"][method][s][task] for s in r["sites"]]
    return [float(np.nanmean([ps[i] for ps in per_site])) for i in range(len(r["seeds"]))]


def markdown(r: dict[str, Any]) -> str:
    out = [f"#### {r['name']} ({r['dataset']}; tasks {', '.join(r['tasks'])})", ""]
    if r["note"]:
        out += [r["note"], ""]
    out += [
        f"Seeds {r['seeds']}; backbone/specialist/FiLM {r['steps']} steps, heads {r['head_steps']} steps; "
        f"test subjects per site {r['n_test_subjects']}, train subjects per site {r['n_train_subjects']}. "
        "Cells: test Dice, mean ± sd over seeds.",
        "",
        "| site | task | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---:|" * len(METHODS),
    ]
    for t in r["tasks"]:
        for s in r["sites"]:
            out.append(f"| {s} | {t} | " + " | ".join(pm(r["dice"][m][s][t]) for m in METHODS) + " |")
        out.append(
            f"| **mean** | {t} | " + " | ".join(f"**{pm(site_mean(r, m, t))}**" for m in METHODS) + " |"
        )
    backbone = ms(r["seconds"]["backbone"])[0]
    out += [
        "",
        "| model part | parameters | % of network | training CPU seconds (mean) | x universal model's |",
        "|---|---:|---:|---:|---:|",
    ]
    out.append(f"| backbone + universal head | {r['params']['network']:,} | 100 | {backbone:.1f} | 1.00 |")
    for n in HEAD_NS:
        p, sec = r["params"][f"head n={n}"], ms(r["seconds"][f"head n={n}"])[0]
        out.append(
            f"| head n={n} (per site) | {p:,} | {100 * p / r['params']['network']:.1f} | {sec:.1f} | {sec / backbone:.3f} |"
        )
    sp, fi = ms(r["seconds"]["specialist"])[0], ms(r["seconds"]["FiLM"])[0]
    out.append(
        f"| specialist (per site) | {r['params']['network']:,} | 100 | {sp:.1f} | {sp / backbone:.2f} |"
    )
    out.append(
        f"| FiLM (whole model; per-site part {r['params']['FiLM per site']}) | {r['params']['network'] + (len(r['sites']) + 1) * r['params']['FiLM per site']:,} | – | {fi:.1f} | {fi / backbone:.2f} |"
    )
    hy = ms(r["seconds"]["hyper"])[0]
    out.append(
        f"| site hypernetwork (MIP; θ₀ = a network, + hypernetwork) | {r['params']['network'] + r['params']['hyper']:,} | – | {hy:.1f} | {hy / backbone:.2f} |"
    )
    if r["curve"]:
        c, new = r["curve"], r["new_site"]
        out += [
            "",
            f"Few-shot curve: new site **{new}** left out of backbone training; heads (n = 1, 2; "
            f"{r['head_steps']} steps) from k labelled TRAIN subjects of {new}; Dice on its TEST subjects "
            "(mean ± sd over seeds). k = 0: that backbone's universal head. References: the universal "
            f"model trained WITH {new}, and {new}'s specialist (all its train subjects).",
            "",
            "| k | " + " | ".join(f"{t} n={n}" for t in r["tasks"] for n in CURVE_HEAD_NS) + " |",
            "|---:|" + "---:|" * len(r["tasks"]) * len(CURVE_HEAD_NS),
            "| 0 | " + " | ".join(pm(c["k=0"][t]) for t in r["tasks"] for _ in CURVE_HEAD_NS) + " |",
        ]
        for k in c[f"n={CURVE_HEAD_NS[0]}"]:
            cells = [pm(c[f"n={n}"][k][t]) for t in r["tasks"] for n in CURVE_HEAD_NS]
            out.append(f"| {k} | " + " | ".join(cells) + " |")
        for m in ("universal", "specialist"):
            cells = [pm(r["dice"][m][new][t]) for t in r["tasks"] for _ in CURVE_HEAD_NS]
            out.append(f"| ref: {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def goals(r: dict[str, Any]) -> list[str]:
    """The issue's goals, checked on this bench (per head depth n)."""
    lines = []
    for n in HEAD_NS:
        m = f"heads n={n}"
        cells = [(s, t) for s in r["sites"] for t in r["tasks"]]
        ok = sum(ms(r["dice"][m][s][t])[0] >= ms(r["dice"]["universal"][s][t])[0] for s, t in cells)
        gain = np.nanmean([ms(r["dice"][m][s][t])[0] - ms(r["dice"]["universal"][s][t])[0] for s, t in cells])
        sec = ms(r["seconds"][f"head n={n}"])[0] / ms(r["seconds"]["backbone"])[0]
        lines.append(
            f"{r['name']}, {m}: ≥ universal on {ok}/{len(cells)} site×task cells, mean gain {100 * gain:+.1f} "
            f"Dice points; fine-tune CPU time {100 * sec:.1f}% of the universal model's"
        )
    cells = [(s, t) for s in r["sites"] for t in r["tasks"]]
    hyper = {c: ms(r["dice"]["hyper"][c[0]][c[1]])[0] for c in cells}
    ok_u = sum(hyper[c] >= ms(r["dice"]["universal"][c[0]][c[1]])[0] for c in cells)
    best_heads = {c: max(ms(r["dice"][f"heads n={n}"][c[0]][c[1]])[0] for n in HEAD_NS) for c in cells}
    within = sum(hyper[c] >= best_heads[c] - 0.01 for c in cells)
    lines.append(
        f"{r['name']}, site hypernetwork: ≥ universal on {ok_u}/{len(cells)} cells; within 1 point of (or above) "
        f"the best heads on {within}/{len(cells)}; mean vs best heads "
        f"{100 * np.nanmean([hyper[c] - best_heads[c] for c in cells]):+.1f} points"
    )
    if r["curve"]:
        for n in CURVE_HEAD_NS:
            for t in r["tasks"]:
                k5, k0 = ms(r["curve"][f"n={n}"]["5"][t])[0], ms(r["curve"]["k=0"][t])[0]
                lines.append(
                    f"{r['name']}, new site {r['new_site']}, {t}: k=5 head n={n} {k5:.3f} vs the universal "
                    f"model trained without the site {k0:.3f} -> {'beats' if k5 > k0 else 'does NOT beat'} it"
                )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, small phantoms only, k up to 5")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument(
        "--steps", type=int, default=None, help="universal/specialist/FiLM steps (default 250; quick 150)"
    )
    ap.add_argument("--head-steps", type=int, default=None, help="steps per head (default steps/10)")
    ap.add_argument(
        "--data", default=None, help="comma list of phantom,wbc,sct (default all; quick: phantom)"
    )
    ap.add_argument("--out", type=Path, default=None, help="write results.json and tables.md here")
    ap.add_argument("--preset", default="tiny", help="network preset (tiny: 3.7 k parameters; small: 483 k)")
    ap.add_argument("--no-curve", action="store_true", help="skip the few-shot curve of a left-out site")
    args = ap.parse_args()
    torch.set_num_threads(1)  # see module docstring
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (150 if args.quick else 250)
    head_steps = args.head_steps or max(1, steps // 10)
    data = (args.data or ("phantom" if args.quick else "phantom,wbc,sct")).split(",")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    makers = {
        "phantom": phantom_bench,
        "wbc": wbc_bench,
        "sct": sct_bench,
        "axon": axon_bench,
        "nuclei": nuclei_bench,
    }
    results, tables, goal_lines = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, d in enumerate(data):
            bench = makers[d](Path(tmp) / f"data{i}", args.quick, seeds)
            if bench is None:
                continue
            r = run_bench(bench, steps, head_steps, log, args.preset, not args.no_curve)
            results.append(r)
            tables.append(markdown(r))
            goal_lines += goals(r)
            print(tables[-1], flush=True)
    header = (
        f"{datetime.date.today()} · {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"1 thread, CPU only (shared machine: other jobs ran at the same time; timings are noisy, compare "
        f"the ratios) · preset {args.preset}, 64 px, Adam 1e-2, batch 8 · total {time.perf_counter() - t0:.0f} s"
    )
    text = "\n\n".join([header, *tables, "Goals:\n" + "\n".join(f"- {g}" for g in goal_lines)])
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "tables.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
