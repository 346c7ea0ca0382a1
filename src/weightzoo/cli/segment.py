"""`weightzoo segment`: segment one image with a model folder, in the spirit of `sct_deepseg -i IMAGE`.

    weightzoo segment -i t2.nii.gz -m runs/cord -o t2_seg.nii.gz [-thr 0.5] [--largest] [--qc qc/]

NIfTI input: segmented slice by slice along the model's axis; the output has exactly the input's
shape, affine, header and on-disk orientation. 2-D input (PNG/BMP/TIFF): a PNG (or BMP/TIFF) mask.
Masks hold 0/1 (the nnU-Net label convention; use --qc for a picture). `-thr 0` writes the sigmoid
probabilities instead: float32 NIfTI, or for 2-D a PNG scaled 0..255 / a float32 TIFF (name it .tif).
Multi-task models: `--task T` writes that task only; without it, one file per task, named OUT with
`_TASK` inserted before the extension (out.nii.gz -> out_cord.nii.gz, out_lesion.nii.gz).

3-D models (`weightzoo train --dims 3`) and nnU-Net checkpoints ingested into a zoo (`-m ZOO:CKPT`,
e.g. `-m zoo/:3f2a..._e1000`) segment the whole volume with nnU-Net's preprocessing and sliding
window (`--mirror`: its mirroring TTA). An nnU-Net softmax (label) model writes nnU-Net's label map,
one file (`--task LABEL`: that label as a 0/1 mask).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from weightzoo.data.io import NIFTI_ENDINGS, Image, file_ending, read_image, write_like
from weightzoo.errors import InputError, UnknownNameError
from weightzoo.fileio import check_output_file, check_output_folder
from weightzoo.heads import is_heads_folder, load_any_model
from weightzoo.hyper.model import hyper_segmenter, is_hyper_folder
from weightzoo.postprocess import largest_component, threshold
from weightzoo.segmenter import MODEL_JSON, load_model, segment_image

OUT_2D_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
# options `segment` and `evaluate` share for --uncertainty
ZOO_OPTION = typer.Option(None, "--zoo", help="Zoo for --uncertainty zoo:K.")
MC_SEED_OPTION = typer.Option(0, "--seed", help="Seed of MC-dropout sampling.")


def default_output(image_path: Path) -> Path:
    """SCT-style default: IMAGE_seg.EXT beside the input (.png for 2-D inputs)."""
    end = file_ending(image_path)
    stem = image_path.name[: -len(end)] if end else image_path.name
    return image_path.with_name(f"{stem}_seg{end if end in NIFTI_ENDINGS else '.png'}")


def output_paths(out: Path, tasks: list[str], one_file: bool) -> dict[str, Path]:
    """{task: path}: `out` itself for one task, else `out` with `_TASK` before its extension."""
    if one_file:
        return {tasks[0]: out}
    return {t: with_suffix_before_ending(out, f"_{t}") for t in tasks}


def _kind(name: str, written: dict[str, Path], thr: float) -> str:
    """', uncertainty map' for a map (`TASK_MAP` beside its TASK), ', probabilities' for -thr 0."""
    from weightzoo.uncertainty.maps import MAPS

    task, _, suffix = name.rpartition("_")
    if suffix in MAPS and task in written:
        return ", uncertainty map"
    return ", probabilities" if thr == 0 else ""


def with_suffix_before_ending(path: Path, suffix: str) -> Path:
    """out.nii.gz + '_entropy' -> out_entropy.nii.gz."""
    end = file_ending(path)
    stem = path.name[: -len(end)] if end and path.name.lower().endswith(end) else path.name
    return path.with_name(f"{stem}{suffix}{path.name[len(stem) :]}")


def _check_output(out: Path, image: Image) -> None:
    allowed = NIFTI_ENDINGS if image.is_volume else OUT_2D_ENDINGS
    if file_ending(out) not in allowed:
        kind = "a NIfTI" if image.is_volume else "a 2-D"
        raise InputError(
            f"output type '{file_ending(out)}' does not fit {kind} input",
            f"name the output with one of {', '.join(allowed)}",
            out,
        )


def segment_file(
    image_path: Path,
    model_dir: Path,
    out: Path | None = None,
    thr: float = 0.5,
    largest: bool = False,
    qc_dir: Path | None = None,
    task: str | None = None,
    device: str = "auto",
    site: str | None = None,
    uncertainty: str | None = None,
    zoo: Path | None = None,
    seed: int = 0,
    scale: float | None = None,
    mirror: bool = False,
) -> dict[str, Path]:
    """Segment one image file; returns {task: written file} (plus {task_MAP: file} for each
    uncertainty map). See the module docstring."""
    if largest and thr == 0:
        raise InputError(
            "--largest needs a binary mask, but -thr 0 asks for probabilities",
            "give -thr > 0 (e.g. 0.5)",
            image_path,
        )
    if thr != 0:
        threshold(np.zeros(1), thr)  # reject a bad threshold before any work
    image = read_image(image_path)
    zoo_ckpt = zoo_checkpoint(model_dir)
    if zoo_ckpt is not None:  # an nnU-Net checkpoint ingested into a zoo, with its plans
        from weightzoo.segmenter import resolve_device
        from weightzoo.volume.predictor import volume_segmenter_from_zoo

        seg = volume_segmenter_from_zoo(*zoo_ckpt, device=resolve_device(device))
        model_dir = zoo_ckpt[0]
    elif is_hyper_folder(model_dir):  # a hypernetwork: --scale or --site picks the weights
        seg = hyper_segmenter(model_dir, scale, site, device)
    elif scale is not None:
        raise InputError("--scale needs a scale hypernetwork folder (hyper.json)", "drop --scale", model_dir)
    elif is_heads_folder(model_dir):  # site heads: --site picks the head (none: the universal head)
        seg = load_any_model(model_dir, site=site, device=device)
    else:
        seg = load_model(model_dir, device=device)
    if task is not None and task not in seg.tasks:
        raise UnknownNameError("task", task, seg.tasks, Path(model_dir) / MODEL_JSON)
    if mirror and not hasattr(seg, "segment_volume"):
        raise InputError(
            "--mirror is nnU-Net's TTA for 3-D models",
            "drop --mirror (or see --uncertainty tta:T)",
            model_dir,
        )
    if getattr(seg, "output_kind", "sigmoid") == "softmax":  # nnU-Net label model: its label map
        if uncertainty is not None or largest or qc_dir is not None:
            raise InputError(
                "--uncertainty, --largest and --qc work on per-task masks; this nnU-Net model writes a label map",
                "drop them (or post-process the label map)",
                model_dir,
            )
        return _write_label_map(
            seg, image, out or default_output(Path(image_path)), thr, task, mirror, [Path(image_path)]
        )
    tasks = [task] if task is not None else list(seg.tasks)
    out = out or default_output(Path(image_path))
    paths = output_paths(out, tasks, one_file=task is not None or len(seg.tasks) == 1)
    source = None
    if uncertainty is not None:
        from weightzoo.uncertainty.maps import MAPS
        from weightzoo.uncertainty.sources import SampledSegmenter, make_source

        source, seg = make_source(uncertainty, seg, seed, zoo, site, task)
        for t in list(paths):
            for m in MAPS:
                paths[f"{t}_{m}"] = with_suffix_before_ending(paths[t], f"_{m}")
    inputs = [Path(image_path), *Path(model_dir).glob("*"), *Path(model_dir).glob("*/*")]
    for p in paths.values():
        check_output_file(p, inputs)
        _check_output(p, image)
    if qc_dir is not None:
        check_output_folder(qc_dir, "--qc folder")
    if source is None:
        probs = segment_image(seg, image, mirror)  # [K, *spatial] on the image grid (canonical for volumes)
    else:  # every map on the image grid; the mask comes from the mean of the samples
        maps_seg = SampledSegmenter(seg, source)
        all_maps = segment_image(maps_seg, image)  # [K·4, *spatial]
        for name, path in paths.items():
            if name in maps_seg.tasks:
                write_like(
                    path, all_maps[maps_seg.tasks.index(name)].astype(np.float32), image, dtype=np.float32
                )
        probs = np.stack([all_maps[maps_seg.tasks.index(f"{t}_mean")] for t in seg.tasks])
    for t, path in paths.items():
        if t not in seg.tasks:
            continue  # an uncertainty map, written above
        p = probs[seg.tasks.index(t)]
        if thr == 0:
            write_like(path, p.astype(np.float32), image, dtype=np.float32)
            mask = p > 0.5
        else:
            mask = threshold(p, thr)
            if largest:
                mask = largest_component(mask)
            write_like(path, mask, image, dtype=np.uint8)
        if qc_dir is not None:
            from weightzoo.qc import write_overlay

            end = file_ending(path)
            name = path.name[: -len(end)] if end else path.name
            write_overlay(
                Path(qc_dir) / f"{name}_qc.png",
                image,
                mask,
                axis=getattr(seg.preprocessing, "axis", 2),
                title=f"{image.path.name}: {t}",
            )
    return paths


def zoo_checkpoint(model: Path) -> tuple[Path, str] | None:
    """`ZOO:CKPT` (a zoo folder, a colon, a checkpoint id) -> (zoo, ckpt); None for a model folder."""
    from weightzoo.zoo.store import MANIFEST

    text = str(model)
    if ":" not in text or Path(text).exists():
        return None
    zoo, _, ckpt = text.rpartition(":")
    if not (Path(zoo) / MANIFEST).is_file():
        raise InputError(
            f"{zoo!r} is not a zoo (no {MANIFEST})",
            "give -m ZOO:CKPT with a zoo folder, or a model folder",
            zoo,
        )
    return Path(zoo), ckpt


def _write_label_map(
    seg: object, image: Image, out: Path, thr: float, task: str | None, mirror: bool, inputs: list[Path]
) -> dict[str, Path]:
    """nnU-Net's label map of a softmax model (argmax, exported as nnU-Net does); -thr 0: one
    probability file per label; --task: that label as a 0/1 mask."""
    _check_output(out, image)
    if thr == 0:
        probs = seg.segment_volume(image, mirror=mirror)  # type: ignore[attr-defined]
        paths = output_paths(out, [task] if task else list(seg.tasks), task is not None)  # type: ignore[attr-defined]
        for t, p in paths.items():
            check_output_file(p, inputs)
            write_like(p, probs[seg.tasks.index(t)].astype(np.float32), image, dtype=np.float32)  # type: ignore[attr-defined]
        return paths
    check_output_file(out, inputs)
    labels = seg.segment_labels(image, mirror=mirror)  # type: ignore[attr-defined]
    if task is not None:
        value = seg.pipeline.task_labels[task]  # type: ignore[attr-defined]
        labels = np.isin(labels, value)
    write_like(
        out,
        labels.astype(np.uint8 if labels.max() < 256 else np.uint16),
        image,
        dtype=np.uint8 if labels.max() < 256 else np.uint16,
    )
    return {task or "labels": out}


SCALE_OPTION = typer.Option(
    None, "--scale", help="φ of a scale hypernetwork (hyper.json folder): the accuracy-cost point to run."
)


def register(app: typer.Typer) -> None:
    @app.command("segment")
    def segment(
        image: Path = typer.Option(
            ..., "-i", "--image", help="NIfTI volume (.nii/.nii.gz) or 2-D image (PNG/BMP/TIFF)."
        ),
        model: Path = typer.Option(
            ...,
            "-m",
            "--model",
            help="Model folder (model.json), heads or hyper folder, or ZOO:CKPT (an ingested nnU-Net checkpoint).",
        ),
        out: Path | None = typer.Option(
            None, "-o", "--out", help="Output file (default: IMAGE_seg.nii.gz / IMAGE_seg.png)."
        ),
        thr: float = typer.Option(
            0.5, "-thr", "--threshold", help="Binarisation threshold in (0, 1); 0 writes probabilities."
        ),
        largest: bool = typer.Option(
            False, "--largest", help="Keep only the largest connected component (3-D for volumes)."
        ),
        qc: Path | None = typer.Option(None, "--qc", help="Folder for a QC overlay PNG."),
        task: str | None = typer.Option(
            None, "--task", help="Task (output channel) of a multi-task model (default: all, one file each)."
        ),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
        site: str | None = typer.Option(
            None,
            "--site",
            help="Site of the image: picks its head in a heads model (default: universal head), its "
            "weights in a site hypernetwork; the zoo site of --uncertainty zoo:K.",
        ),
        uncertainty: str | None = typer.Option(
            None,
            "--uncertainty",
            help="mc:T (MC dropout) | tta:T (flips/rotations) | zoo:K (--zoo, --site): also write OUT_mean, "
            "OUT_var, OUT_entropy, OUT_mi maps on the input grid (docs/uncertainty.md).",
        ),
        zoo: Path | None = ZOO_OPTION,
        seed: int = MC_SEED_OPTION,
        scale: float | None = SCALE_OPTION,
        mirror: bool = typer.Option(
            False,
            "--mirror",
            help="3-D models: nnU-Net's mirroring test-time augmentation (slower, as nnU-Net's default).",
        ),
    ) -> None:
        """Segment an image with a trained model; the mask lies exactly on the input's grid.

        -m takes a model folder, or ZOO:CKPT for an nnU-Net checkpoint ingested into a zoo."""
        written = segment_file(
            image, model, out, thr, largest, qc, task, device, site, uncertainty, zoo, seed, scale, mirror
        )
        console = Console()
        for t, p in written.items():
            console.print(
                f"[green]wrote[/] {escape(str(p))}  ({escape(t)}{_kind(t, written, thr)})",
                highlight=False,
                soft_wrap=True,
            )
        if qc is not None:
            console.print(f"[green]QC[/] overlay(s) in {escape(str(qc))}", highlight=False, soft_wrap=True)


__all__ = ["default_output", "output_paths", "register", "segment_file"]
