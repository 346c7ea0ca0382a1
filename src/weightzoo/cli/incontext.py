"""`weightzoo incontext`: segment from a labelled support set with no training; train and evaluate models.

    weightzoo incontext -i query.png --support support_dir/ -o out.png [--candidates 5] [--ensemble 4] [--tta 8]
    weightzoo incontext -i volume.nii.gz --support support_dir/ -o mask.nii.gz      # slice by slice
    weightzoo incontext train --tasks synth,phantom --out model/ [--preset cpu] [--device auto]
    weightzoo incontext eval --model model/ --heldout wbc-nucleus,sct-cord --support-sizes 1,2,4,8,16,32,64

Shape: one command group. Given -i, the group itself segments (and a subcommand is then an error);
without -i it runs the `train` or `eval` subcommand.

support_dir/: `NAME.ext` images with `NAME_mask.ext` masks (PNG/BMP/TIFF/NIfTI; NIfTI volumes give
their axial slices with foreground; multi-label masks need --label), or an nnU-Net raw dataset folder
with --task (and optionally --site). Output: a 0/1 mask on exactly the input's grid (NIfTI: the input's
shape, affine, header and orientation, via write_like); -thr 0 writes probabilities. With
--candidates K > 1, one file per candidate: OUT with `_cand1` ... `_candK` before the extension.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from weightzoo.cli.options import distributed_options
from weightzoo.errors import InputError

console = Console(highlight=False)


def candidate_paths(out: Path, k: int) -> list[Path]:
    """[out] for one candidate, else out with _cand1.._candK inserted before its extension."""
    from weightzoo.data.io import file_ending

    if k == 1:
        return [out]
    end = file_ending(out)
    stem = out.name[: -len(end)] if end else out.name
    return [out.with_name(f"{stem}_cand{i + 1}{end}") for i in range(k)]


def incontext_file(
    image_path: Path,
    support: Path,
    out: Path,
    candidates: int = 1,
    ensemble: int = 1,
    tta: int = 0,
    thr: float = 0.5,
    model: Path | None = None,
    task: str | None = None,
    site: str | None = None,
    label: int | None = None,
    max_support: int = 64,
    seed: int = 0,
    device: str = "auto",
) -> list[Path]:
    """Segment one image file (2-D or NIfTI, slice by slice) from a support folder; returns written files."""
    from weightzoo import incontext
    from weightzoo.cli.segment import _check_output
    from weightzoo.data.io import read_image, write_like

    if not 0 <= thr < 1:
        raise InputError(f"threshold {thr}", "give -thr in (0, 1), or 0 for probabilities")
    image = read_image(image_path)
    paths = candidate_paths(Path(out), candidates)
    for p in paths:
        _check_output(p, image)
    sup_x, sup_y, _ = incontext.load_support(support, task, site, label, max_support)
    net = incontext.load_model(model, device)
    kw = dict(candidates=candidates, ensemble=ensemble, tta=tta, model=net, seed=seed, device=device)
    if image.is_volume:
        vol = image.array[0]  # canonical [X, Y, Z]; axial slices along Z
        probs = incontext.segment_batch([vol[:, :, z] for z in range(vol.shape[2])], sup_x, sup_y, **kw)
        prob = np.stack(probs, axis=-1)  # [K, X, Y, Z]
    else:
        prob = incontext.segment(image.array, sup_x, sup_y, **kw)  # [K, H, W]
    for k, p in enumerate(paths):
        if thr == 0:
            write_like(p, prob[k].astype(np.float32), image, dtype=np.float32)
        else:
            write_like(p, (prob[k] >= thr).astype(np.uint8), image, dtype=np.uint8)
    return paths


def _positive(text: str, what: str, kind: type = int) -> list:
    """'1,2,4' -> [1, 2, 4] (kind int) or '0.2,0.8' -> [0.2, 0.8] (kind float); one-line error otherwise."""
    example = "1,2,4,8" if kind is int else "0.2,0.8"
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(
            f"{what} '{text}' is not a comma-separated list of {kind.__name__}s", f"e.g. {example}"
        ) from None
    if not vals or min(vals) <= 0:
        raise InputError(f"{what} '{text}'", f"give positive numbers, e.g. {example}")
    return vals


def _ints(text: str, what: str) -> list[int]:
    return _positive(text, what, int)


def register(app: typer.Typer) -> None:
    ic = typer.Typer(
        help="In-context segmentation from labelled examples, no training. With -i: segment (`weightzoo incontext -i q.png --support dir/ -o out.png`); without -i: run `train` or `eval`.",
        invoke_without_command=True,
    )

    @ic.callback(invoke_without_command=True)
    def incontext_main(
        ctx: typer.Context,
        image: Path | None = typer.Option(None, "-i", "--image", help="Query: 2-D image or NIfTI volume."),
        support: Path | None = typer.Option(
            None, "--support", help="Folder of NAME.ext + NAME_mask.ext pairs, or an nnU-Net raw dataset."
        ),
        out: Path | None = typer.Option(
            None, "-o", "--out", help="Output mask (.png/.nii.gz on the input's grid)."
        ),
        candidates: int = typer.Option(
            1, "--candidates", help="Number of plausible segmentations (one file each)."
        ),
        ensemble: int = typer.Option(1, "--ensemble", help="Average over this many random support subsets."),
        tta: int = typer.Option(
            0, "--tta", help="Also average over this many augmented copies of the support."
        ),
        thr: float = typer.Option(
            0.5, "-thr", "--threshold", help="Binarisation threshold; 0 writes probabilities."
        ),
        model: Path | None = typer.Option(
            None, "-m", "--model", help="Model folder (default: shipped weights)."
        ),
        task: str | None = typer.Option(None, "--task", help="Task of a raw-dataset support."),
        site: str | None = typer.Option(None, "--site", help="Only this site of a raw-dataset support."),
        label: int | None = typer.Option(None, "--label", help="Label value of multi-label support masks."),
        max_support: int = typer.Option(64, "--max-support", help="Use at most this many support examples."),
        seed: int = typer.Option(0, "--seed", help="Seed for noise, subsets and augmentation."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    ) -> None:
        """Segment -i IMAGE as the --support examples define the task (or run `train` / `eval`)."""
        if ctx.invoked_subcommand is not None:
            if image is not None:
                raise InputError(f"-i cannot be combined with `{ctx.invoked_subcommand}`", "drop one of them")
            return
        if image is None:
            console.print(ctx.get_help())
            raise typer.Exit(0)
        if support is None or out is None:
            raise InputError(
                "segmentation needs --support and -o", "e.g. -i q.png --support examples/ -o q_seg.png"
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = incontext_file(
                image,
                support,
                out,
                candidates,
                ensemble,
                tta,
                thr,
                model,
                task,
                site,
                label,
                max_support,
                seed,
                device,
            )
        for w in caught:
            console.print(f"[yellow]warning:[/] {escape(str(w.message))}", soft_wrap=True)
        for p in written:
            console.print(f"[green]wrote[/] {escape(str(p))}", soft_wrap=True)

    @ic.command("train")
    @distributed_options(local_sgd=False)
    def train_cmd(
        tasks: str | None = typer.Option(
            None,
            "--tasks",
            help="Sources (default: the preset's): synth, synth-shapes, synth-superpixel, phantom, raw:PATH, "
            "real (real data from the folder in $WEIGHTZOO_DATA), real:NAME, real-texture, "
            "curves, real-texture-curves (thin structures).",
        ),
        weights: str | None = typer.Option(
            None, "--weights", help="One sampling weight per --tasks entry, e.g. 0.2,0.8 (default: equal)."
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (resumes its checkpoint)."),
        preset: str = typer.Option(
            "cpu",
            "--preset",
            help="tiny (tests) | cpu (the base of the shipped model) | cpu-ft (the shipped model: fine-tunes "
            "--init) | cpu-v1 (the first one) | gpu.",
        ),
        init: str | None = typer.Option(
            None, "--init", help="Fine-tune from this model folder ('shipped': the installed weights)."
        ),
        steps: int | None = typer.Option(None, "--steps", help="Override the preset's steps."),
        features: str | None = typer.Option(None, "--features", help="Channels per level, e.g. 8,16,24,32."),
        warmup: int | None = typer.Option(None, "--warmup", help="Warm-up steps."),
        val_tasks: int | None = typer.Option(None, "--val-tasks", help="Fixed validation tasks."),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    ) -> None:
        """Train an in-context model on sampled tasks (held-out tasks are refused)."""
        import shlex
        import sys

        from weightzoo.incontext.train import InContextConfig, train_incontext

        over: dict = {"seed": seed, "device": device}
        if tasks is not None:  # new sources: the preset's per-source weights no longer apply
            over["sources"] = [t.strip() for t in tasks.split(",") if t.strip()]
            over["weights"] = None
        if weights is not None:
            over["weights"] = _positive(weights, "--weights", float)
        for key, val in (("steps", steps), ("warmup", warmup), ("val_tasks", val_tasks), ("init", init)):
            if val is not None:
                over[key] = val
        if features:
            over["features"] = _ints(features, "--features")
        cfg = InContextConfig.preset(preset, **over)
        meta = train_incontext(cfg, out, command="weightzoo " + shlex.join(sys.argv[1:]), log=console.print)
        console.print(
            f"[green]wrote[/] {escape(str(out))} ({meta['n_params']} parameters, {meta['seconds']:.0f} s)"
        )

    @ic.command("eval")
    def eval_cmd(
        model: Path | None = typer.Option(
            None, "--model", "-m", help="Model folder (default: shipped weights)."
        ),
        heldout: str | None = typer.Option(
            None,
            "--heldout",
            help="Held-out tasks, comma-separated (default: every real one: wbc-nucleus, wbc-cell, "
            "wbc2-nucleus, wbc2-cell, sct-cord, sct-cord-t1, sct-gm, chase-vessels, hc18-head; "
            "also phantom-canal, phantom-D-cord).",
        ),
        support_sizes: str = typer.Option("1,2,4,8,16,32,64", "--support-sizes", help="Support sizes S."),
        data: Path | None = typer.Option(
            None,
            "--data",
            help="Real-data folder holding wbc/, sct_testing_data/, chasedb1/, hc18/ "
            "(default: $WEIGHTZOO_DATA).",
        ),
        out: Path = typer.Option(
            Path("incontext_eval"), "--out", "-o", help="Folder for results.json, results.md, report.html."
        ),
        repeats: int = typer.Option(3, "--repeats", help="Seeded support draws per S."),
        queries: int = typer.Option(16, "--queries", help="Query images per task (whole subjects)."),
        limit: int = typer.Option(120, "--limit", help="At most this many images per task."),
        ensemble: int = typer.Option(
            3, "--ensemble", help="Independent draws averaged by the UniverSeg ensemble (<= 1: off)."
        ),
        ensemble_subsets: int = typer.Option(
            0, "--ensemble-subsets", help="Also average this many 3/4 subsets of each draw (0: off)."
        ),
        candidates: int = typer.Option(
            5, "--candidates", help="K candidates for best-of-K and GED (1: off)."
        ),
        candidate_sizes: str = typer.Option(
            "4,16", "--candidate-sizes", help="S values with candidates (first draw), or 'all'."
        ),
        nnunet: bool = typer.Option(
            False, "--nnunet", help="Also train a small nnU-Net on the support (slow on a CPU)."
        ),
        nnunet_steps: int = typer.Option(150, "--nnunet-steps", help="Its training steps (0: skip it)."),
        nnunet_sizes: str = typer.Option(
            "4,16", "--nnunet-sizes", help="S values for the nnU-Net, or 'all'."
        ),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option("auto", "--device"),
    ) -> None:
        """Dice vs support size on held-out tasks: single, ensemble, mean-of-support baseline, candidates
        (best-of-K, GED), optional nnU-Net; the mean over real tasks against UniverSeg and the goals."""
        from weightzoo.incontext.evalreport import checks_markdown
        from weightzoo.incontext.evaluate import DEFAULT_TASKS, EvalSettings, run_evaluation

        def sizes(text: str, what: str) -> tuple[int, ...] | None:
            return None if text.strip() == "all" else tuple(_ints(text, what))

        settings = EvalSettings(
            support_sizes=tuple(_ints(support_sizes, "--support-sizes")),
            repeats=repeats,
            n_queries=queries,
            limit=limit,
            ensemble=ensemble,
            subsets=ensemble_subsets,
            candidates=candidates,
            candidate_sizes=sizes(candidate_sizes, "--candidate-sizes"),
            nnunet_steps=nnunet_steps if nnunet else 0,
            nnunet_sizes=sizes(nnunet_sizes, "--nnunet-sizes"),
            seed=seed,
        )
        for name, v in (("--repeats", repeats), ("--queries", queries), ("--limit", limit)):
            if v < 1:
                raise InputError(f"{name} {v}", f"give {name} >= 1")
        names = [t.strip() for t in heldout.split(",") if t.strip()] if heldout else list(DEFAULT_TASKS)

        def log(m: str) -> None:
            console.print(escape(m), soft_wrap=True)

        res = run_evaluation(model, names, out, settings, data_root=data, device=device, log=log)
        console.print(escape(checks_markdown(res["checks"])), soft_wrap=True)
        console.print(f"[green]wrote[/] {escape(str(out / 'results.md'))}, {escape(str(res['report']))}")

    app.add_typer(ic, name="incontext")


__all__ = ["candidate_paths", "incontext_file", "register"]
