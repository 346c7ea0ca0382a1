"""Between a zoo and nnU-Net results folders: ingest a lab's trained nnU-Nets, export a checkpoint.

The reading and writing of nnU-Net's files is weightzoo.zoo.nnunet's; this module maps them onto
the zoo's runs and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from weightzoo.fileio import inside, plain_name


def ingest_results(
    folder: str | Path, zoo_path: str | Path, split: str = "train", sites: list[str] | None = None
) -> dict[str, int]:
    """Add every checkpoint of an nnU-Net results folder to a zoo (one run per trainer folder and fold).

    Per-task val_dice comes from nnU-Net's `dice_per_class_or_region` (foreground heads), task "*"
    holds ema_fg_dice and mean_fg_dice; the step is nnU-Net's epoch. Idempotent."""
    from weightzoo.zoo.nnunet import read_nnunet_results
    from weightzoo.zoo.store import PendingCheckpoint, Zoo

    found = read_nnunet_results(folder)
    runs: dict[str, list[Any]] = {}
    for ck in found:
        key = json.dumps(
            [
                ck.dataset_name,
                ck.trainer_name,
                ck.plans_name,
                ck.configuration,
                ck.fold,
                ck.spec.hash(),
                str(ck.path.parent.parent.resolve()),
            ]
        )
        runs.setdefault(hashlib.sha256(key.encode()).hexdigest()[:16], []).append(ck)
    added = {"runs": 0, "checkpoints": 0, "skipped_runs": 0}
    with Zoo(zoo_path, create=True, writable=True) as z:
        for run_id, cks in runs.items():
            by_epoch: dict[int, Any] = {}
            for ck in cks:  # final, best, latest: the first at an epoch wins (same epoch, same weights)
                by_epoch.setdefault(ck.epoch, ck)
            first = cks[0]
            z.add_dataset(first.dataset_name, first.dataset_json, {"source": "nnunet"})
            new = z.add_run(
                run_id,
                first.spec,
                first.tasks,
                sites or [],
                split,
                len(by_epoch),
                config={
                    "trainer_name": first.trainer_name,
                    "plans_name": first.plans_name,
                    "configuration": first.configuration,
                },
                dataset=first.dataset_name,
                source="nnunet",
                info={
                    "folder": str(first.path.parent.parent),
                    "fold": first.fold,
                    "trainer_name": first.trainer_name,
                    "configuration": first.configuration,
                    "output_kind": first.output_kind,
                    "task_labels": first.task_labels,
                    "mirror_axes": list(first.mirror_axes) if first.mirror_axes is not None else None,
                    "plans": first.plans,
                    "dataset_json": first.dataset_json,
                },
            )
            if not new and z.run(run_id).status == "done":
                added["skipped_runs"] += 1
                continue
            fg = first.tasks[1:] if first.output_kind == "softmax" else first.tasks
            items = []
            for epoch, ck in sorted(by_epoch.items()):
                m = ck.metrics
                per = m.get("dice_per_class_or_region") or []
                metrics: dict[str, dict[str, float | None]] = {
                    t: {"val_dice": float(d) if d is not None else None}
                    for t, d in zip(fg, per, strict=False)
                }
                metrics["*"] = {k: m.get(k) for k in ("ema_fg_dice", "mean_fg_dice") if m.get(k) is not None}
                own = ck.info if ck.info.get("zoo_checkpoint") else {}  # one of our exports: its zoo metrics
                for t, vals in (own.get("metrics") or {}).items():
                    metrics.setdefault(t, {}).update(vals)
                items.append(
                    PendingCheckpoint(
                        run_id,
                        epoch,
                        ck.checkpoint,
                        ck.state,
                        train_loss=m.get("train_loss")
                        if m.get("train_loss") is not None
                        else own.get("train_loss"),
                        val_loss=m.get("val_loss") if m.get("val_loss") is not None else own.get("val_loss"),
                        lr=(ck.history.get("lrs") or [None])[-1],
                        metrics={k: v for k, v in metrics.items() if v},
                        info={"file": str(ck.path), "checkpoint": ck.checkpoint},
                    )
                )
            added["checkpoints"] += len(z.commit(items, done_runs=[run_id]))
            added["runs"] += 1
    return added


def export_checkpoint(
    zoo_path: str | Path, ckpt_id: str, out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write checkpoint `ckpt_id` as an nnU-Net v2 results folder under `out_dir` (= nnUNet_results);
    returns the written checkpoint_final.pth."""
    from weightzoo.errors import InputError
    from weightzoo.zoo.nnunet import nnunet_dataset_json, write_nnunet_results
    from weightzoo.zoo.store import Zoo

    with Zoo(zoo_path) as z:
        rec = z.checkpoint(ckpt_id)
        run = z.run(rec.run_id)
        spec = z.spec(run.arch_hash)
        state = z.load(rec)
        info = {
            "zoo_checkpoint": ckpt_id,
            "run_id": run.run_id,
            "step": rec.step,
            "tasks": run.tasks,
            "metrics": rec.metrics,
            "train_loss": rec.train_loss,
            "val_loss": rec.val_loss,
        }
        if run.source == "nnunet":
            djson, plans = run.info["dataset_json"], run.info["plans"]
            config, trainer = run.info["configuration"], run.info["trainer_name"]
            name = plans.get("dataset_name", run.dataset or "Dataset999_weightzoo")
            mirror = run.info.get("mirror_axes")
            kwargs: dict[str, Any] = {}
        else:
            src = z.dataset_json(run.dataset or "") or {}
            tasks = src.get("tasks") or {}
            missing = [t for t in run.tasks if t not in tasks]
            if missing:
                raise InputError(
                    f"the zoo does not know the label values of task(s) {missing}",
                    "rebuild the zoo",
                    zoo_path,
                )
            prep = run.info.get("preprocessing", {})
            name = run.dataset or "Dataset999_weightzoo"
            if prep.get("dims") == 3:  # a 3-D run: its pipeline's plans, as for a 3-D model folder
                from weightzoo.data.slices import Preprocessing

                desc = {
                    "name": name,
                    "channel_names": src.get("channel_names"),
                    "task_labels": tasks,
                    "file_ending": src.get("file_ending"),
                }
                return export_network(
                    out_dir, spec, state, run.tasks, Preprocessing.from_dict(prep), desc, info, overwrite
                )
            djson = nnunet_dataset_json(
                src.get("channel_names", {"0": "image"}),
                {t: tasks[t] for t in run.tasks},
                src.get("file_ending", ".nii.gz"),
                name=name.split("_", 1)[-1],
            )
            plans, config, trainer = None, "2d", "nnUNetTrainer"
            mirror = [0, 1] if run.config.get("augment", 0) > 0 else None
            kwargs = {
                "dataset_name": name,
                "patch_size": prep.get("size", [64, 64]),
                "normalization": prep.get("normalization", "zscore"),
            }
        # every name here came from a file (the zoo's manifest, an ingested checkpoint): one path
        # component each, and the folder must stay inside out_dir
        parts = [
            plain_name(name, "dataset name", zoo_path),
            plain_name(trainer, "trainer name", zoo_path),
            plain_name((plans or {}).get("plans_name", "nnUNetPlans"), "plans name", zoo_path),
            plain_name(config, "configuration name", zoo_path),
        ]
        folder = inside(out_dir, Path(out_dir) / parts[0] / f"{parts[1]}__{parts[2]}__{parts[3]}")
        return write_nnunet_results(
            folder, spec, state, djson, plans, configuration=config, trainer_name=trainer, mirror_axes=mirror,
            info=info, overwrite=overwrite, **kwargs,
        )  # fmt: skip


def export_network(
    parent: str | Path,
    spec: Any,
    state: Any,
    tasks: list[str],
    preprocessing: Any,
    description: dict[str, Any],
    info: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """A network given as (spec, real state dict) as an nnU-Net v2 trainer folder under `parent`
    (= nnUNet_results): `Dataset.../nnUNetTrainer__nnUNetPlans__2d/fold_0/checkpoint_final.pth`.

    description: `name` (DatasetXXX_Name), `channel_names`, `task_labels`, `file_ending`."""
    import re

    from weightzoo.zoo.nnunet import nnunet_dataset_json, write_nnunet_results

    name = str(description.get("name") or "")
    name = name if re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_\-]+", name) else "Dataset999_weightzoo"
    channels = description.get("channel_names") or {str(i): f"channel{i}" for i in range(spec.input_channels)}
    labels = description.get("task_labels") or {t: [i + 1] for i, t in enumerate(tasks)}
    ending = str(description.get("file_ending") or ".nii.gz")
    three_d = getattr(preprocessing, "dims", 2) == 3
    extra: dict[str, Any] = {"patch_size": list(preprocessing.size)}
    if three_d:  # the exact plans the model was trained and predicts with (weightzoo.volume.data)
        from weightzoo.volume.preprocess import VolumePipeline

        pipe = VolumePipeline.from_dict(preprocessing.pipeline)
        extra = {
            "patch_size": list(pipe.patch_size),
            "spacing": list(pipe.spacing),
            "mirror_axes": pipe.mirror_axes,
        }
    config = "3d_fullres" if three_d else "2d"
    return write_nnunet_results(
        Path(parent) / name / f"nnUNetTrainer__nnUNetPlans__{config}",
        spec,
        state,
        nnunet_dataset_json(channels, {t: labels[t] for t in tasks}, ending, name),
        configuration=config,
        info=info,
        overwrite=overwrite,
        dataset_name=name,
        normalization=preprocessing.normalization,
        **extra,
    )


def _description_of(meta: dict[str, Any], dataset: str | Path | None) -> dict[str, Any] | None:
    """Dataset name, channels, label values and file ending for a model folder's tasks, from (in order)
    `dataset`, the model's own info, the dataset folder it was trained on, or the zoo it came from."""
    from weightzoo.data.raw import RawDataset

    info = meta.get("info") or {}
    if dataset is None and info.get("task_labels"):
        return {
            "name": info.get("dataset"),
            "channel_names": info.get("channel_names"),
            "task_labels": info["task_labels"],
            "file_ending": info.get("file_ending"),
        }
    candidates = [dataset] if dataset is not None else [info.get("dataset_path")]
    for path in candidates:
        if path and (Path(path) / "dataset.json").is_file():
            ds = RawDataset.open(path)
            return {
                "name": ds.name,
                "channel_names": dict(ds.meta["channel_names"]),
                "task_labels": {t: ds.task_labels(t) for t in meta["tasks"] if t in ds.tasks},
                "file_ending": ds.file_ending,
            }
    if dataset is None and info.get("zoo") and info.get("dataset") and Path(info["zoo"]).is_dir():
        from weightzoo.zoo.store import Zoo

        with Zoo(info["zoo"]) as z:
            dj = z.dataset_json(str(info["dataset"])) or {}
        if dj.get("tasks"):
            return {
                "name": info["dataset"],
                "channel_names": dj.get("channel_names"),
                "task_labels": dj["tasks"],
                "file_ending": dj.get("file_ending"),
            }
    return None


def export_model_folder(
    model_dir: str | Path, out_dir: str | Path, overwrite: bool = False, dataset: str | Path | None = None
) -> Path:
    """Write a weightzoo model folder (from `train`, `generate sample`, `merge`, `heads export`) as an
    nnU-Net v2 results folder under `out_dir` (= nnUNet_results); returns the checkpoint_final.pth.

    Label values come from `dataset`, the model's info, its training dataset or its zoo; when none is
    found, task k is written as label k+1 with a WeightzooWarning."""
    import warnings

    from weightzoo.errors import WeightzooWarning
    from weightzoo.nets.unet import require_plain_unet
    from weightzoo.segmenter import load_model, read_model_json

    meta = read_model_json(model_dir)
    seg = load_model(model_dir, "cpu")  # checks the weights against the architecture
    require_plain_unet(seg.spec, "the zoo and nnU-Net export", model_dir)
    desc = _description_of(meta, dataset)
    missing = [t for t in seg.tasks if t not in ((desc or {}).get("task_labels") or {})]
    if desc is None or missing:
        warnings.warn(
            f"{model_dir}: label values of task(s) {missing or seg.tasks} unknown; wrote task k as label k+1 "
            "(pass --dataset DATASET to use the dataset's label values)",
            WeightzooWarning,
            stacklevel=2,
        )
        desc = {**(desc or {}), "task_labels": {t: [i + 1] for i, t in enumerate(seg.tasks)}}
    from weightzoo.nets.unet import real_state_dict

    info = {"model_folder": str(model_dir), "route": meta.get("route"), "tasks": seg.tasks}
    return export_network(
        out_dir, seg.spec, real_state_dict(seg.net), seg.tasks, seg.preprocessing, desc, info, overwrite
    )
