"""Weight generation from one base: soups, merges and the delta generator against every baseline.

    python benchmarks/delta_generate.py --work bench_delta [--threads 2] [--gen-seeds 5] [--quick]

Stages (each resumable: the dataset, base, zoo and generators are kept in --work):
  data   phantoms, 8 sites (A..H) x N subjects, 32 px; split by subject 60/20/20 per site
  base   one cord+gm+canal network (small preset) on sites A..F only: G and H are never seen
  zoo    fine-tunes of the base: task sets cord, gm, canal, cord+gm+canal x sites A..F x seeds,
         trainable norm_seg (5 seeds) and all (2 seeds); runs split 60/20/20 (train/val/test runs)
  gen    delta generators (norm_seg) with --gen-seeds seeds, on the zoo's TRAINING-split runs
  eval   TEST-split subjects only here; every choice (best checkpoint, greedy soup, best-of-8, λ) on val

Prints markdown tables (G1..G4, speed) and writes --work/results.json. Noise baseline (Zeng et al.
2025): the val-best training checkpoint's delta plus Gaussian noise with the per-tensor spread that
separates generated samples from their nearest training delta, so it is as "novel" as the generator.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune_site import finetune
from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.data.synth import make_phantom_dataset
from weightzoo.generate.delta import DeltaGenConfig, DeltaLayout, delta_runs, train_delta_generator
from weightzoo.generate.delta_eval import final_checkpoint, val_score
from weightzoo.generate.delta_sample import DeltaGenerator
from weightzoo.generate.evaluate import Scorer, mean_sd
from weightzoo.generate.site_embedding import dataset_site_images, embed_sites, site_embedding
from weightzoo.nets.unet import build_network, load_real_state_dict
from weightzoo.segmenter import NetSegmenter
from weightzoo.train.config import TrainConfig
from weightzoo.train.loop import train_model
from weightzoo.zoo.base import load_base
from weightzoo.zoo.build import build_zoo
from weightzoo.zoo.store import Zoo

TASKS = ["cord", "gm", "canal"]
SEEN, HELD_OUT = ["A", "B", "C", "D", "E", "F"], ["G", "H"]
K_STEPS = (5, 20, 100)


def fmt(v: list[float]) -> str:
    m, s, n = mean_sd(v)
    return "–" if n == 0 else (f"{m:.3f}" if n == 1 else f"{m:.3f} ± {s:.3f}")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a, self.work = args, Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_lines: list[str] = []

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    # ---- stages -------------------------------------------------------------------------------------
    def data(self) -> RawDataset:
        root = self.work / "data"
        found = sorted(root.glob("Dataset*")) if root.is_dir() else []
        if found:
            return RawDataset.open(found[0])
        return make_phantom_dataset(
            root, sites=8, subjects_per_site=self.a.subjects, size=32, n_slices=8, seed=0
        )

    def base(self, ds: RawDataset) -> Path:
        out = self.work / "base"
        cfg = TrainConfig(
            tasks=TASKS, preset=self.a.preset, steps=self.a.base_steps, batch_size=16, size=(32, 32), seed=0
        )
        t0 = time.perf_counter()
        train_model(ds, cfg, out, sites=SEEN, progress=False)
        self.say(f"base: {time.perf_counter() - t0:.0f} s")
        return out

    def zoo(self, ds: RawDataset, base: Path) -> Path:
        grids = [
            {"trainable": "norm_seg", "seeds": self.a.zoo_seeds},
            {"trainable": "all", "seeds": self.a.all_seeds},
        ]
        path = self.work / "zoo"
        for g in grids:
            grid = {
                "from": str(base),
                "tasks": [*TASKS, TASKS],
                "sites": SEEN,
                "optimizer": "adam",
                "lr": 1e-3,
                "steps": self.a.ft_steps,
                "batch_size": 8,
                "checkpoints": 2,
                "run_split": {"train": 0.6, "val": 0.2, "test": 0.2},
                **g,
            }
            t0 = time.perf_counter()
            res = build_zoo(ds, grid, path, device="cpu", progress=False, log=lambda m: None)
            self.say(
                f"zoo ({g['trainable']}): {res.runs_trained} runs trained in {time.perf_counter() - t0:.0f} s"
            )
        return path

    def generators(self, zoo: Path) -> list[Path]:
        out = []
        for s in range(self.a.gen_seeds):
            cfg = DeltaGenConfig(subset="norm_seg", steps=self.a.gen_steps, seed=s)
            t0 = time.perf_counter()
            train_delta_generator(zoo, self.work / f"gen{s}", cfg, log=lambda m: None)
            self.say(f"generator seed {s}: {time.perf_counter() - t0:.0f} s")
            out.append(self.work / f"gen{s}")
        return out

    # ---- helpers ------------------------------------------------------------------------------------
    def finetune(
        self, ds: RawDataset, base: Path, tasks: list[str], site: str, steps: int, seed: int
    ) -> tuple[dict[str, torch.Tensor], float]:
        """A fine-tune of the base with labels (the zoo's recipe): final state, seconds."""
        return finetune(ds, base, tasks, site, steps, seed)

    def seg(self, state: dict[str, torch.Tensor], tasks: list[str]) -> NetSegmenter:
        spec = self.base_net.spec.with_classes(len(tasks))
        return NetSegmenter(
            load_real_state_dict(build_network(spec), state), spec, tasks, self.prep, "x", 0.0, "cpu"
        )

    def dice(
        self, state: dict[str, torch.Tensor], tasks: list[str], site: str, split: str = "test"
    ) -> dict[str, float]:
        return self.scorer.dice(self.seg(state, tasks), split, site)

    # ---- evaluation ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        torch.set_num_threads(self.a.threads)
        t_all = time.perf_counter()
        ds = self.data()
        base_dir = self.base(ds)
        zoo_dir = self.zoo(ds, base_dir)
        gens = [DeltaGenerator.load(p) for p in self.generators(zoo_dir)]
        self.base_net = load_base(base_dir)
        self.prep = Preprocessing("zscore", (32, 32), 2, 1)
        self.scorer = Scorer(ds, self.prep)
        zoo = Zoo(zoo_dir)
        bid = self.base_net.base_id
        layout = DeltaLayout(self.base_net, "norm_seg")
        res: dict[str, Any] = {"device": "cpu", "threads": self.a.threads, "args": vars(self.a)}

        def runs_of(tasks: list[str], site: str, subset: str | None, splits=("train", "val")) -> list[Any]:
            out = []
            for sp in splits:
                out += [
                    r
                    for r in delta_runs(zoo, bid, subset or "all", sp)
                    if r.tasks == tasks and r.sites == [site]
                ]
            return out

        def final_state(r: Any) -> dict[str, torch.Tensor]:
            return zoo.load(final_checkpoint(zoo, r))

        def val_of(r: Any) -> float:
            return val_score(zoo, r)

        def best_run(tasks: list[str], site: str, subset: str | None) -> Any:
            return max(runs_of(tasks, site, subset), key=val_of)

        # G1 / G2: every (task, seen site)
        rows = []
        for task in TASKS:
            for site in SEEN:
                row: dict[str, Any] = {"task": task, "site": site}
                base_state = self.base_net.restricted([task])[1]
                row["base"] = [self.dice(base_state, [task], site)[task]]
                for k in K_STEPS:
                    row[f"base+{k}"] = [
                        self.dice(self.finetune(ds, base_dir, [task], site, k, s)[0], [task], site)[task]
                        for s in range(self.a.seeds)
                    ]
                best = best_run([task], site, None)
                row["zoo best (val)"] = [self.dice(final_state(best), [task], site)[task]]
                ns = runs_of([task], site, "norm_seg")
                if not [r for r in ns if r.split == "train"]:
                    self.say(
                        f"{task}@{site}: no training-split norm_seg runs (all in the test split): skipped"
                    )
                    continue
                ns_states = [final_state(r) for r in ns]
                soup = {k: torch.stack([s[k] for s in ns_states]).mean(0) for k in ns_states[0]}
                row["uniform soup"] = [self.dice(soup, [task], site)[task]]
                row["greedy soup (val)"] = [
                    self.dice(self.greedy(ns, ns_states, val_of, [task], site), [task], site)[task]
                ]
                # generated: one-shot and best-of-8 on val, per generator
                one, bo8, nearest_d = [], [], []
                emb_seen = None
                for gi, g in enumerate(gens):
                    emb = g.embed_images(dataset_site_images(ds, site, self.prep, n=8, seed=gi))
                    emb_seen = emb
                    r8 = g.sample([task], emb, candidates=8, seed=gi)
                    one.append(self.dice(r8.states[0], [task], site)[task])
                    i, _ = g.select_on_val(r8, ds, site)
                    bo8.append(self.dice(r8.states[i], [task], site)[task])
                    # distance of the sample to its nearest training delta (for the noise baseline)
                    dvec = layout.run_vector(r8.states[0], [task])[0]
                    train_vecs = [
                        layout.run_vector(final_state(r), [task])[0] for r in ns if r.split == "train"
                    ]
                    nearest_d.append(min(float((dvec - v).norm()) for v in train_vecs))
                row["generated one-shot"] = one
                row["generated best-of-8 (val)"] = bo8
                # Zeng et al.: nearest (val-best norm_seg) training delta + noise of the generator's novelty
                nb = max([r for r in ns if r.split == "train"], key=val_of)
                nb_vec = layout.run_vector(final_state(nb), [task])[0]
                sigma = float(np.mean(nearest_d)) / math.sqrt(layout.numel)
                noisy = []
                for s in range(self.a.seeds):
                    g_ = torch.Generator().manual_seed(s)
                    noise = (
                        torch.randn(layout.numel, generator=g_)
                        * sigma
                        * (layout.run_vector(final_state(nb), [task])[1]).float()
                    )
                    noisy.append(self.dice(layout.state(nb_vec + noise, [task]), [task], site)[task])
                row["noisy nearest"] = noisy
                row["nearest dist"] = nearest_d
                rows.append(row)
                del emb_seen
                self.say(" ".join(f"{k}={fmt(v) if isinstance(v, list) else v}" for k, v in row.items()))
        res["g1"] = rows

        # G3: one network for three tasks, per seen site
        g3 = []
        for site in SEEN:
            row = {"site": site}
            for t in TASKS:
                row[f"specialist {t}"] = self.dice(final_state(best_run([t], site, None)), [t], site)[t]
            jt = best_run(TASKS, site, None)
            row["joint fine-tune"] = self.dice(final_state(jt), TASKS, site)
            ms = runs_of(TASKS, site, "norm_seg")
            sts = [final_state(r) for r in ms]
            row["uniform soup (multi-task)"] = self.dice(
                {k: torch.stack([s[k] for s in sts]).mean(0) for k in sts[0]}, TASKS, site
            )
            row["task arithmetic (val λ)"] = self.task_arithmetic(site, best_run, final_state)
            gen_d = []
            for gi, g in enumerate(gens):
                emb = g.embed_images(dataset_site_images(ds, site, self.prep, n=8, seed=gi))
                r8 = g.sample(TASKS, emb, candidates=8, seed=gi)
                i, _ = g.select_on_val(r8, ds, site)
                gen_d.append(self.dice(r8.states[i], TASKS, site))
            row["generated best-of-8"] = {t: [d[t] for d in gen_d] for t in TASKS}
            g3.append(row)
            self.say(f"G3 {site}: {row}")
        res["g3"] = g3

        # G4: sites the base and zoo never saw, from <= 8 unlabelled images
        feats = embed_sites(self.base_net_module(), ds, SEEN, self.prep, "train")
        g4 = []
        for task in TASKS:
            for site in HELD_OUT:
                row = {"task": task, "site": site}
                base_state = self.base_net.restricted([task])[1]
                row["base"] = [self.dice(base_state, [task], site)[task]]
                ft, secs = [], []
                for s in range(self.a.seeds):
                    st, sec = self.finetune(ds, base_dir, [task], site, 100, s)
                    ft.append(self.dice(st, [task], site)[task])
                    secs.append(sec)
                row["base+100 (labels)"], row["ft seconds"] = ft, secs
                one, _bo8u, unk = [], [], []
                for gi, g in enumerate(gens):
                    emb = g.embed_images(dataset_site_images(ds, site, self.prep, n=8, seed=gi))
                    r = g.sample([task], emb, candidates=1, seed=gi)
                    one.append(self.dice(r.states[0], [task], site)[task])
                    ru = g.sample([task], None, candidates=1, seed=gi)
                    unk.append(self.dice(ru.states[0], [task], site)[task])
                row["generated (8 unlabelled images)"] = one
                row["generated (site unknown)"] = unk
                # kNN: the zoo site whose embedding is nearest; its val-best delta for the task
                e = site_embedding(torch.as_tensor(self.base_feats(ds, site)))
                near = min(SEEN, key=lambda s: float((site_embedding(feats[s]) - e).norm()))
                row["nearest site"] = near
                row["kNN nearest site's best"] = [
                    self.dice(final_state(best_run([task], near, None)), [task], site)[task]
                ]
                gain = np.mean(ft) - row["base"][0]
                row["recovery"] = [(x - row["base"][0]) / gain if gain > 1e-6 else math.nan for x in one]
                g4.append(row)
                self.say(" ".join(f"{k}={fmt(v) if isinstance(v, list) else v}" for k, v in row.items()))
        res["g4"] = g4

        # Speed: sample + checks vs fine-tuning to the same test Dice (same machine, same run)
        sp = []
        for row in rows:
            g = gens[0]
            t0 = time.perf_counter()
            r = g.sample([row["task"]], g.seen_site(row["site"]), candidates=1, seed=0)
            g.check(r.states[0])
            t_gen = time.perf_counter() - t0
            d_gen = self.dice(r.states[0], [row["task"]], row["site"])[row["task"]]
            reach = None
            for k in (5, 10, 20, 40, 100, 200):
                st, sec = self.finetune(ds, base_dir, [row["task"]], row["site"], k, 0)
                if self.dice(st, [row["task"]], row["site"])[row["task"]] >= d_gen - 1e-9:
                    reach = (k, sec)
                    break
            sp.append(
                {
                    "task": row["task"],
                    "site": row["site"],
                    "gen seconds": t_gen,
                    "gen dice": d_gen,
                    "ft steps": reach[0] if reach else None,
                    "ft seconds": reach[1] if reach else None,
                }
            )
            if len(sp) >= 6:
                break
        res["speed"] = sp
        res["seconds"] = time.perf_counter() - t_all
        (self.work / "results.json").write_text(json.dumps(res, indent=1, default=float))
        return res

    def base_net_module(self) -> torch.nn.Module:
        from weightzoo.generate.delta import base_network

        return base_network(self.base_net)

    def base_feats(self, ds: RawDataset, site: str) -> np.ndarray:
        from weightzoo.generate.site_embedding import image_features

        return image_features(
            self.base_net_module(), dataset_site_images(ds, site, self.prep, n=8, seed=0)
        ).numpy()

    def greedy(self, runs: list[Any], states: list[dict], val_of, tasks: list[str], site: str) -> dict:
        """Wortsman's greedy soup: by val Dice, add a run if the soup's val Dice does not drop."""
        order = sorted(range(len(runs)), key=lambda i: -val_of(runs[i]))
        chosen = [order[0]]

        def soup(idx: list[int]) -> dict:
            return {k: torch.stack([states[i][k] for i in idx]).mean(0) for k in states[0]}

        best = float(np.mean(list(self.dice(soup(chosen), tasks, site, "val").values())))
        for i in order[1:]:
            v = float(np.mean(list(self.dice(soup([*chosen, i]), tasks, site, "val").values())))
            if v >= best:
                chosen, best = [*chosen, i], v
        return soup(chosen)

    def task_arithmetic(self, site: str, best_run, final_state) -> dict[str, float]:
        """θ = base + λ Σ_k (θ_k − base) over the specialists' bodies, seg rows from each specialist; λ on val."""
        base_full = self.base_net.state
        specs = {t: final_state(best_run([t], site, None)) for t in TASKS}
        best_d, best_v = None, -1.0
        for lam in (0.3, 0.5, 0.7, 1.0):
            st = {}
            for k, b in base_full.items():
                if k.startswith("decoder.seg_layers."):
                    st[k] = torch.cat([specs[t][k] for t in TASKS])
                else:
                    st[k] = b + lam * sum(specs[t][k] - b for t in TASKS)
            v = float(np.mean(list(self.dice(st, TASKS, site, "val").values())))
            if v > best_v:
                best_v, best_d = v, self.dice(st, TASKS, site)
        return best_d


def _ci95(values: list[float]) -> tuple[float, float, float]:
    """mean and a 95 % t-interval of the mean."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - h, m + h


def tables(res: dict[str, Any]) -> str:
    """Markdown tables from results.json (G1/G2, G3, G4, speed)."""
    out = []
    rows = res["g1"]
    cols = [k for k in rows[0] if k not in ("task", "site", "nearest dist")]
    out.append("| task | site | " + " | ".join(cols) + " |")
    out.append("|---" * (len(cols) + 2) + "|")
    for r in rows:
        out.append(f"| {r['task']} | {r['site']} | " + " | ".join(fmt(r[c]) for c in cols) + " |")
    out.append("")
    out.append("Mean over the task × site cells (per seed, then mean ± sd over seeds):")
    out.append("")
    out.append("| route | mean test Dice | − zoo best (points) | 95 % interval (points) | over |")
    out.append("|---|---|---|---|---|")
    best = np.array([r["zoo best (val)"][0] for r in rows])
    for c in cols:
        n = min(len(r[c]) for r in rows)
        if n == 1:  # deterministic route: interval over cells
            diffs = [100 * (r[c][0] - b) for r, b in zip(rows, best, strict=True)]
            over = f"{len(rows)} cells"
            per_seed = [float(np.mean([r[c][0] for r in rows]))]
        else:  # one mean difference per seed
            diffs = [
                100 * float(np.mean([r[c][s] - b for r, b in zip(rows, best, strict=True)])) for s in range(n)
            ]
            over = f"{n} seeds"
            per_seed = [float(np.mean([r[c][s] for r in rows])) for s in range(n)]
        m, lo, hi = _ci95(diffs)
        out.append(f"| {c} | {fmt(per_seed)} | {m:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {over} |")
    out.append("")
    out.append(
        "G3, one network for cord + gm + canal (test Dice per task; generated: mean ± sd over generators):"
    )
    out.append("")
    out.append("| site | route | cord | gm | canal | worst gap to specialist (points) |")
    out.append("|---|---|---|---|---|---|")
    for r in res["g3"]:
        spec = {t: r[f"specialist {t}"] for t in TASKS}
        out.append(f"| {r['site']} | specialists | " + " | ".join(f"{spec[t]:.3f}" for t in TASKS) + " | – |")
        for name in (
            "joint fine-tune",
            "uniform soup (multi-task)",
            "task arithmetic (val λ)",
            "generated best-of-8",
        ):
            if name not in r:
                continue
            d = r[name]
            vals = {t: (d[t] if isinstance(d[t], list) else [d[t]]) for t in TASKS}
            gap = max(100 * (spec[t] - float(np.mean(vals[t]))) for t in TASKS)
            out.append(
                f"| {r['site']} | {name} | " + " | ".join(fmt(vals[t]) for t in TASKS) + f" | {gap:.1f} |"
            )
    out.append("")
    out.append("G4, sites G and H that neither the base nor the zoo saw:")
    out.append("")
    g4c = [
        "base",
        "base+100 (labels)",
        "kNN nearest site's best",
        "generated (8 unlabelled images)",
        "generated (site unknown)",
        "recovery",
    ]
    out.append("| task | site | " + " | ".join(g4c) + " | nearest site |")
    out.append("|---" * (len(g4c) + 3) + "|")
    for r in res["g4"]:
        out.append(
            f"| {r['task']} | {r['site']} | "
            + " | ".join(fmt(r[c]) for c in g4c)
            + f" | {r['nearest site']} |"
        )
    out.append("")
    out.append(
        "Speed (generator seed 0, seen site's stored embedding; fine-tuning all weights, the zoo's recipe):"
    )
    out.append("")
    out.append(
        "| task | site | sample + check (s) | generated test Dice | fine-tune steps to reach it | fine-tune (s) | ratio |"
    )
    out.append("|---|---|---|---|---|---|---|")
    for r in res["speed"]:
        ratio = (
            f"{r['ft seconds'] / r['gen seconds']:.0f}×" if r["ft seconds"] else "not reached in 200 steps"
        )
        ft = f"{r['ft seconds']:.2f}" if r["ft seconds"] else "–"
        out.append(
            f"| {r['task']} | {r['site']} | {r['gen seconds']:.3f} | {r['gen dice']:.3f} | {r['ft steps']} | {ft} | {ratio} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_delta")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="small")
    p.add_argument("--subjects", type=int, default=20)
    p.add_argument("--base-steps", type=int, default=1500)
    p.add_argument("--ft-steps", type=int, default=60)
    p.add_argument("--zoo-seeds", type=int, default=5)
    p.add_argument("--all-seeds", type=int, default=2)
    p.add_argument("--gen-seeds", type=int, default=5)
    p.add_argument("--gen-steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=5, help="seeds of fine-tune and noise baselines")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the script")
    p.add_argument("--tables-only", action="store_true", help="print the tables of --work/results.json")
    a = p.parse_args()
    if a.tables_only:
        print(tables(json.loads((Path(a.work) / "results.json").read_text())))
        return
    if a.quick:
        a.preset, a.subjects, a.base_steps, a.ft_steps, a.zoo_seeds, a.all_seeds = "tiny", 6, 300, 10, 3, 1
        a.gen_seeds, a.gen_steps, a.seeds = 2, 100, 2
    print(tables(Bench(a).run()))


if __name__ == "__main__":
    main()
