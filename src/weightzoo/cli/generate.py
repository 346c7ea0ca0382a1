"""`weightzoo generate train|sample|eval` (weights from a diffusion model trained on a zoo) and
`weightzoo merge` (one network for several tasks by merging the zoo's specialists)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from weightzoo.cli.options import distributed_options

console = Console(highlight=False)
gen_app = typer.Typer(
    help="Generate trained segmentation weights with a diffusion model trained on a checkpoint zoo.",
    no_args_is_help=True,
)


def _tasks(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _targets(value: str, tasks: list[str]) -> dict[str, float]:
    """'0.9' (every task) or 'cord=0.95,gm=0.8' -> {task: Dice}."""
    from weightzoo.errors import InputError

    try:
        if "=" not in value:
            return {t: float(value) for t in tasks}
        out = {}
        for part in value.split(","):
            k, v = part.split("=")
            out[k.strip()] = float(v)
        return out
    except ValueError:
        raise InputError(
            f"--target-dice '{value}' is not a number or TASK=DICE list", "e.g. 0.95 or cord=0.95,gm=0.8"
        ) from None


@gen_app.command("train")
@distributed_options(local_sgd=False)
def train(
    zoo: Path = typer.Option(..., "--zoo", "-z", help="Zoo folder (`weightzoo zoo build`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Generator folder to write (gen/)."),
    preset: str = typer.Option("tiny", help="Generator size: tiny (CPU, tests) | small | default (GPU)."),
    steps: int = typer.Option(None, help="Training steps. (default: the preset's)"),
    batch_size: int = typer.Option(None, "--batch-size", help="Pairs per step. (default: the preset's)"),
    lr: float = typer.Option(None, help="AdamW learning rate. (default: the preset's)"),
    encoder: str = typer.Option(None, help="Token encoder: shared (with layer embeddings) | per_layer."),
    permute: float = typer.Option(
        None, help="Probability of permutation augmentation per pair. (default 0.5)"
    ),
    seed: int = typer.Option(0, help="Random seed; same seed, same generator."),
    net_arch: str = typer.Option(
        None, "--net-arch", help="Zoo architecture (body hash) if the zoo holds several."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the folder's checkpoint."),
    force: bool = typer.Option(False, "--force", help="Overwrite whatever the --out folder holds."),
    kind: str = typer.Option(
        "auto", help="delta (fine-tunes of a base) | gpt (G.pt-style, runs from random inits) | auto."
    ),
    subset: str = typer.Option("norm_seg", help="delta: the fine-tunes' trainable subset to generate."),
    dataset: Path = typer.Option(None, "--dataset", "-d", help="delta: the zoo's dataset if it moved."),
) -> None:
    """Train a generator on the zoo's TRAINING runs.

    delta (default for a zoo of fine-tunes of a base): a diffusion model over the fine-tunes' deltas from
    the base, conditioned on the task set and a site embedding from unlabelled images. gpt: G.pt-style,
    pairs of checkpoints of one run, earlier -> later. Killed? Run the same command again: it resumes.
    """
    from weightzoo.errors import UnknownNameError
    from weightzoo.generate.train import GenTrainConfig, train_generator
    from weightzoo.zoo.store import Zoo

    if kind not in ("auto", "delta", "gpt"):
        raise UnknownNameError("generator kind", kind, ["auto", "delta", "gpt"])
    if kind == "delta" or (kind == "auto" and Zoo(zoo).base_ids()):
        _train_delta(zoo, out, subset, steps, batch_size, lr, seed, device, dataset, resume, force)
        return

    opts = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "encoder": encoder,
        "permute": permute,
        "net_arch": net_arch,
    }
    cfg = GenTrainConfig.from_dict(
        {"preset": preset, "seed": seed, "device": device, **{k: v for k, v in opts.items() if v is not None}}
    )
    res = train_generator(zoo, out, cfg, resume=resume, force=force, log=console.print)
    _trained(
        res,
        out,
        f"{res.meta['n_params']:,} parameters, {res.steps} steps, {res.seconds:.0f} s on {res.meta['device']}",
    )


def _trained(res: Any, out: Path, what: str) -> None:
    """One line on a finished (or already finished) generator training."""
    if res.skipped:
        console.print(f"{out} already holds this finished generator; use --force to retrain")
        return
    last = res.history[-1] if res.history else {}
    console.print(
        f"generator written to [bold]{out}[/] ({what}) · final loss {last.get('loss', math.nan):.4f}"
    )


def _train_delta(
    zoo: Path,
    out: Path,
    subset: str,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    seed: int,
    device: str,
    dataset: Path | None,
    resume: bool,
    force: bool,
) -> None:
    from weightzoo.generate.delta import DeltaGenConfig, train_delta_generator

    opts = {"steps": steps, "batch_size": batch_size, "lr": lr}
    cfg = DeltaGenConfig.from_dict(
        {
            "subset": subset,
            "seed": seed,
            "device": "cpu" if device == "auto" else device,
            **{k: v for k, v in opts.items() if v is not None},
        }
    )
    res = train_delta_generator(zoo, out, cfg, dataset, resume=resume, force=force, log=console.print)
    _trained(
        res,
        out,
        f"delta: {len(res.meta['train_runs'])} fine-tunes, {res.meta['numel']:,} generated values, {res.seconds:.0f} s",
    )


def _sample_delta(
    generator: Path,
    task: str,
    out: Path,
    site: str | None,
    site_images: Path | None,
    candidates: int,
    select_on: str | None,
    dataset: Path | None,
    seed: int,
    ddim_steps: int | None,
) -> None:
    from weightzoo.errors import InputError
    from weightzoo.generate.delta_sample import DEFAULT_DDIM_STEPS, DeltaGenerator
    from weightzoo.generate.site_embedding import folder_images

    gen = DeltaGenerator.load(generator)
    tasks = gen.check_tasks(_tasks(task))
    if site is not None and site_images is not None:
        raise InputError("both --site and --site-images were given", "describe the site one way")
    if site_images is not None:
        emb, how = gen.embed_images(folder_images(site_images, gen.prep)), f"images:{site_images}"
    elif site is not None:
        emb, how = gen.seen_site(site), f"seen:{site}"
    else:
        emb, how = None, "unknown"
    res = gen.sample(tasks, emb, candidates, seed, ddim_steps or DEFAULT_DDIM_STEPS, how)
    pick, info = 0, {}
    if select_on is not None:
        if select_on != "val":
            raise InputError(
                f"--select-on {select_on}: selection is on the validation split only", "use --select-on val"
            )
        if site is None:
            raise InputError(
                "--select-on val needs the labelled site (--site) whose val subjects score the candidates",
                "add --site, or drop --select-on",
            )
        ds_path = dataset or Path(gen.meta.get("dataset_path", ""))
        if not ds_path or not Path(ds_path).is_dir():
            raise InputError("--select-on val needs the dataset", "give --dataset data/DatasetXXX_Name")
        pick, scores = gen.select_on_val(res, ds_path, site)
        info = {"selected_on": "val", "val_dice_candidates": scores}
    info.update(site=res.site, seed=seed, candidates=candidates, candidate=pick, sample_seconds=res.seconds)
    gen.save(res.states[pick], tasks, out, res.seconds, info)
    _generated(tasks, f"site {res.site}, {candidates} candidate(s)", res.seconds, out, info, pick)


def _generated(
    tasks: list[str], what: str, seconds: float, out: Path, info: dict[str, Any], pick: int
) -> None:
    """One line on a written generated network (with its val Dice when it was selected on val)."""
    chosen = info.get("val_dice_candidates", [None])[pick] if "selected_on" in info else None
    extra = f" · val Dice {', '.join(f'{t} {v:.3f}' for t, v in chosen.items())}" if chosen else ""
    console.print(
        f"generated [bold]{', '.join(tasks)}[/] network ({what}) in {seconds:.2f} s → [bold]{out}[/]{extra}"
    )


@gen_app.command("sample")
def sample(
    generator: Path = typer.Option(..., "--generator", "-g", help="Generator folder (`generate train`)."),
    task: str = typer.Option(
        ..., "--task", "-t", help="Task(s), comma-separated: cord or cord,gm,canal (one output each)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (segment/evaluate accept it)."),
    target_dice: str = typer.Option(
        None, "--target-dice", help="gpt: target val Dice: 0.95, or cord=0.95,gm=0.8 (delta: no prompt)."
    ),
    site: str = typer.Option(None, "--site", "-s", help="Site to condition on (default: any site)."),
    site_images: Path = typer.Option(
        None, "--site-images", help="delta: a folder of a few UNLABELLED images of the (new) site."
    ),
    from_init: int = typer.Option(
        None, "--from-init", help="Start from a fresh initialisation with this seed."
    ),
    from_ckpt: str = typer.Option(None, "--from", help="Start from a zoo checkpoint id or a model folder."),
    current_dice: str = typer.Option(
        None, "--current-dice", help="The start's val Dice, if it is not recorded."
    ),
    steps: int = typer.Option(1, help="Recursive prompting: feed the output back this many times."),
    ddim_steps: int = typer.Option(None, "--ddim-steps", help="Denoising steps (default: gpt 10, delta 20)."),
    candidates: int = typer.Option(1, help="Networks drawn in one batch."),
    select_on: str = typer.Option(
        None, "--select-on", help="val: keep the candidate with the best validation Dice."
    ),
    dataset: Path = typer.Option(
        None, "--dataset", "-d", help="Dataset for --select-on (default: the zoo's)."
    ),
    zoo: Path = typer.Option(None, "--zoo", "-z", help="Zoo for --from CKPT_ID (default: the generator's)."),
    seed: int = typer.Option(0, help="Sampling seed (noise; also the init seed unless --from-init)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
) -> None:
    """Generate a trained network and write a model folder.

    delta generators: for a task set and a site given by --site-images (unlabelled), --site (seen), or
    neither. gpt generators: from a start (--from-init / --from) towards --target-dice.
    """
    from weightzoo.errors import InputError
    from weightzoo.generate.sample import Generator, Start, select_on_val
    from weightzoo.generate.train import read_generator_json
    from weightzoo.zoo.store import Zoo

    if read_generator_json(generator).get("kind") == "delta":
        gpt_only = {
            "--target-dice": target_dice,
            "--from-init": from_init,
            "--from": from_ckpt,
            "--current-dice": current_dice,
            "--zoo": zoo,
        }
        given = [k for k, v in gpt_only.items() if v is not None] + (["--steps"] if steps != 1 else [])
        if given:
            raise InputError(
                f"{', '.join(given)}: options of G.pt-style generators; this is a delta generator",
                "drop them (a delta generator takes --task and --site-images or --site)",
                generator,
            )
        _sample_delta(
            generator, task, out, site, site_images, candidates, select_on, dataset, seed, ddim_steps
        )
        return
    if target_dice is None or site_images is not None:
        raise InputError(
            "this is a G.pt-style generator: it needs --target-dice and takes no --site-images",
            "add --target-dice 0.95 (or train a delta generator on a zoo of fine-tunes)",
            generator,
        )
    ddim_steps = ddim_steps or 10
    gen = Generator.load(generator, device)
    tasks = gen.check_tasks(_tasks(task))
    target = _targets(target_dice, tasks)
    if from_init is not None and from_ckpt is not None:
        raise InputError("both --from-init and --from were given", "start from one of them")
    zoo_obj = None
    if from_ckpt is not None and not Path(from_ckpt).is_dir():
        zoo_obj = Zoo(zoo or gen.meta["zoo"])
        start = Start.from_zoo(zoo_obj, from_ckpt)
    elif from_ckpt is not None:
        start = Start.from_model(from_ckpt)
    else:
        start = Start.from_init(seed if from_init is None else from_init)
    current = _targets(current_dice, tasks) if current_dice else None
    res = gen.sample(tasks, target, site, start, candidates, steps, ddim_steps, seed, current)
    pick, info = 0, {}
    if select_on is not None:
        if select_on != "val":
            raise InputError(
                f"--select-on {select_on}: selection is on the validation split only", "use --select-on val"
            )
        ds_path = dataset
        if ds_path is None:
            zoo_obj = zoo_obj or Zoo(zoo or gen.meta["zoo"])
            ds_path = zoo_obj.dataset_path(gen.meta.get("dataset"))
        if ds_path is None:
            raise InputError("--select-on val needs the dataset", "give --dataset data/DatasetXXX_Name")
        sel = select_on_val(gen, res, ds_path, [site] if site else None)
        pick, info = sel.index, {"selected_on": "val", "val_dice_candidates": sel.val_dice}
    info.update(
        target_dice=res.target,
        site=res.site or "any",
        start=res.start,
        steps=res.steps,
        ddim_steps=res.ddim_steps,
        seed=res.seed,
        candidates=candidates,
        candidate=pick,
        sample_seconds=res.seconds,
    )
    gen.save(res.vectors[pick], tasks, out, res.seconds, info)
    target = ", ".join(f"{t} {v:.2f}" for t, v in res.target.items())
    _generated(
        tasks, f"target {target}, site {site or 'any'}, from {res.start}", res.seconds, out, info, pick
    )


@gen_app.command("eval")
def evaluate(
    generator: list[Path] = typer.Option(
        ..., "--generator", "-g", help="Generator folder (repeat for several seeds)."
    ),
    zoo: Path = typer.Option(..., "--zoo", "-z", help="The zoo the generators were trained on."),
    dataset: Path = typer.Option(
        ..., "--dataset", "-d", help="The zoo's dataset (its TEST split is scored)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for summary.json and report.html."),
    candidates: int = typer.Option(8, help="Candidates for best-of-N selection on val."),
    ddim_steps: int = typer.Option(10, "--ddim-steps", help="Denoising steps per prompt."),
    parts: str = typer.Option(
        "best,alignment,general,multitask,time", help="Parts to run (time trains one network from scratch)."
    ),
    device: str = typer.Option("cpu", help="cpu | cuda | auto: where to sample, score and time training."),
) -> None:
    """Evaluate generators on the TEST subjects (every selection on val).

    gpt: vs the zoo's best checkpoint, prompt alignment, generalisation, multi-task, time. delta: vs the
    base, the zoo's best checkpoint, soups and the noisy-nearest baseline; sites no zoo run saw."""
    from weightzoo.generate.evaluate import evaluate_generators, fmt
    from weightzoo.generate.train import read_generator_json

    if read_generator_json(generator[0]).get("kind") == "delta":
        from weightzoo.generate.delta_eval import evaluate_delta_generators

        evaluate_delta_generators(generator, zoo, dataset, out, candidates, log=console.print)
        console.print(f"report: [bold]{out / 'report.html'}[/]")
        return

    res = evaluate_generators(
        generator,
        zoo,
        dataset,
        out,
        candidates,
        ddim_steps,
        parts=_tasks(parts),
        log=console.print,
        device=device,
    )
    for r in res.get("best", []):
        console.print(
            f"{r['task']:>8} @ {r['site']}: zoo best test Dice {r['zoo best test']:.3f} · generated one-shot "
            f"{fmt(r['generated one-shot'])} · from the best checkpoint {fmt(r[next(k for k in r if k.startswith('from'))])}"
        )
    console.print(f"report: [bold]{out / 'report.html'}[/]")


def register(app: typer.Typer) -> None:
    """Add the `generate` command group and the `merge` command to `app`."""
    app.add_typer(gen_app, name="generate")

    @app.command("merge")
    def merge(
        zoo: Path = typer.Option(
            ..., "--zoo", "-z", help="Zoo with single-task runs of each task (one seed)."
        ),
        tasks: str = typer.Option(
            ..., "--tasks", "-t", help="Tasks to merge, comma-separated: cord,gm,canal."
        ),
        method: str = typer.Option("ties", help="average | task-arithmetic | ties | dare."),
        out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
        site: str = typer.Option(None, "--site", "-s", help="Use specialists trained on this site."),
        seed: int = typer.Option(None, help="Use specialists of this seed (default: the best group on val)."),
        lam: float = typer.Option(
            None, "--lambda", help="Scale of the task vectors (default: chosen on val)."
        ),
        density: float = typer.Option(0.2, help="TIES: fraction of each task vector kept."),
        drop: float = typer.Option(0.9, help="DARE: probability of dropping each task-vector entry."),
        dare_seed: int = typer.Option(0, "--dare-seed", help="DARE: seed of the drop mask."),
        dataset: Path = typer.Option(
            None, "--dataset", "-d", help="Dataset whose val split picks λ (default: the zoo's)."
        ),
    ) -> None:
        """Merge the zoo's single-task specialists into ONE network with an output per task (from their
        shared base when they are fine-tunes of one, docs/zoo.md)."""
        from weightzoo.data.slices import Preprocessing
        from weightzoo.generate.merge import merge_zoo, save_merged
        from weightzoo.zoo.store import Zoo

        z = Zoo(zoo)
        task_list = _tasks(tasks)
        runs = z.runs(task=task_list[0]) if task_list else []
        ds_path = dataset or (z.dataset_path(runs[0].dataset) if runs else None)
        info = runs[0].info.get("preprocessing") if runs else None
        prep = Preprocessing.from_dict(info) if info else _prep_from_config(runs[0].config if runs else {})
        res = merge_zoo(z, task_list, method, site, seed, lam, density, ds_path, prep, drop, dare_seed)
        info_out = {"zoo": str(zoo.resolve()), "dataset": runs[0].dataset if runs else None}
        if ds_path is not None:
            info_out["dataset_path"] = str(Path(ds_path).resolve())
        save_merged(res, out, prep, info_out)
        val = (
            f" · val Dice {', '.join(f'{t} {v:.3f}' for t, v in res.val_dice.items())}"
            if res.val_dice
            else ""
        )
        lam_s = f" λ={res.lam:g}" if res.lam is not None else ""
        start = f"base {res.specialists.base}" if res.specialists.base else f"seed {res.specialists.seed}"
        console.print(f"merged {', '.join(task_list)} ({method}{lam_s}, {start}) → [bold]{out}[/]{val}")


def _prep_from_config(cfg: dict[str, Any]) -> Any:
    from weightzoo.data.slices import Preprocessing

    return Preprocessing(
        cfg.get("normalization", "zscore"), tuple(cfg.get("size", (64, 64))), int(cfg.get("axis", 2)), 1
    )
