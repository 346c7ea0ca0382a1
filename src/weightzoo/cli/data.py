"""`weightzoo data ...`: make phantom datasets, import real data, and describe a dataset."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from weightzoo.data.raw import SPLIT_NAMES, RawDataset

console = Console(highlight=False)


def _run(fn: Callable[..., RawDataset], *args: Any, **kwargs: Any) -> RawDataset:
    """Call an importer, showing its DataWarnings as yellow lines and the dataset it wrote."""
    from weightzoo.data.importers import DataWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        ds = fn(*args, **kwargs)
    for w in caught:
        if issubclass(w.category, DataWarning):
            console.print(f"[yellow]warning:[/] {w.message}", soft_wrap=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    console.print(
        f"wrote [bold]{ds.root}[/] ({len(ds.cases())} cases, sites: {', '.join(ds.sites())})", soft_wrap=True
    )
    return ds


def info_table(ds: RawDataset) -> Table:
    """Per-site cases/subjects and split sizes (subjects) of a dataset, as a rich table."""
    splits = {k: set(v) for k, v in ds.splits().items()}
    tasks = ", ".join(f"{t}={v}" for t, v in ds.tasks.items())
    table = Table(title=ds.name, caption=f"{ds.n_channels} channel(s), {ds.file_ending}; tasks: {tasks}")
    for col in ("site", "cases", "subjects", *(f"{s} subj." for s in SPLIT_NAMES)):
        table.add_column(col, justify="left" if col == "site" else "right")
    rows: dict[str, tuple[list[str], set[str]]] = {}
    for c in ds.cases():
        cases, subs = rows.setdefault(ds.site(c), ([], set()))
        cases.append(c)
        subs.add(ds.subject(c))
    total_c, total_s = 0, set()
    for site in sorted(rows):
        cases, subs = rows[site]
        total_c += len(cases)
        total_s |= subs
        table.add_row(
            site, str(len(cases)), str(len(subs)), *(str(len(subs & splits[k])) for k in SPLIT_NAMES)
        )
    table.add_row(
        "all",
        str(total_c),
        str(len(total_s)),
        *(str(len(total_s & splits[k])) for k in SPLIT_NAMES),
        style="bold",
    )
    return table


def register(app: typer.Typer) -> None:
    """Add the `data` command group to `app`."""
    data_app = typer.Typer(help="Create, import and inspect nnU-Net raw datasets.", no_args_is_help=True)

    @data_app.command("synth")
    def synth(
        out: Path = typer.Option(..., "--out", "-o", help="Folder to create DatasetXXX_<name> in."),
        sites: int = typer.Option(4, help="Number of sites (A, B, C, D, ...), each its own contrast."),
        subjects: int = typer.Option(24, help="Subjects PER SITE (one volume each)."),
        size: int = typer.Option(64, help="In-plane size (pixels)."),
        slices: int = typer.Option(8, help="Axial slices per volume."),
        seed: int = typer.Option(0, help="Random seed (same seed, same dataset)."),
        dataset_id: int = typer.Option(None, "--id", help="nnU-Net dataset id (default: next free >= 501)."),
        name: str = typer.Option("Phantom", help="Dataset name."),
        raters: int = typer.Option(
            0, min=0, max=64, help="Extra annotations per case (boundary jitter, lesions left out) for GED."
        ),
    ) -> None:
        """Generate synthetic spinal-cord phantoms (tasks cord, gm, canal, lesion; several sites)."""
        from weightzoo.data.synth import make_phantom_dataset

        _run(make_phantom_dataset, out, sites, subjects, size, slices, seed, dataset_id, name, raters)

    @data_app.command("import-wbc")
    def import_wbc_cmd(
        src: Path = typer.Argument(..., help="WBC folder holding 'Dataset 1' and 'Dataset 2'."),
        out: Path = typer.Argument(..., help="Folder to create DatasetXXX_WBC in."),
        limit: int = typer.Option(None, min=1, help="Import only the first N images of each source."),
        size: int = typer.Option(None, help="Resize every image to SIZE x SIZE (default: keep)."),
        dataset_id: int = typer.Option(None, "--id", help="nnU-Net dataset id (default: next free >= 501)."),
    ) -> None:
        """Import the white-blood-cell data set (sites Dataset1/Dataset2; tasks nucleus, cell, cytoplasm)."""
        from weightzoo.data.importers import import_wbc

        _run(import_wbc, src, out, size=size, limit=limit, dataset_id=dataset_id)

    @data_app.command("import-axondeepseg")
    def import_axondeepseg_cmd(
        srcs: list[Path] = typer.Argument(..., help="AxonDeepSeg BIDS folder(s): SEM and/or TEM."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to create DatasetXXX_AxonEM in."),
        tile: int = typer.Option(256, min=16, help="Cut each image into TILE x TILE px crops."),
        size: int = typer.Option(64, min=8, help="Resize every crop to SIZE x SIZE."),
        dataset_id: int = typer.Option(None, "--id", help="nnU-Net dataset id (default: next free >= 501)."),
    ) -> None:
        """Import AxonDeepSeg SEM/TEM (sites = modality; tasks axon, myelin, axonmyelin)."""
        from weightzoo.data.import_microscopy import import_axondeepseg

        _run(import_axondeepseg, srcs, out, tile=tile, size=size, dataset_id=dataset_id)

    @data_app.command("import-dsb2018")
    def import_dsb2018_cmd(
        src: Path = typer.Argument(..., help="dsb2018_nuclei folder (images/, labels/)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to create DatasetXXX_DSB2018 in."),
        tile: int = typer.Option(256, min=16, help="Cut each image into TILE x TILE px crops."),
        size: int = typer.Option(64, min=8, help="Resize every crop to SIZE x SIZE."),
        per_site: int = typer.Option(None, min=1, help="Import only the first N images of each site."),
        dataset_id: int = typer.Option(None, "--id", help="nnU-Net dataset id (default: next free >= 501)."),
    ) -> None:
        """Import DSB 2018 nuclei (task nucleus; site = acquisition type: modality x image size)."""
        from weightzoo.data.import_microscopy import import_dsb2018

        _run(import_dsb2018, src, out, tile=tile, size=size, per_site=per_site, dataset_id=dataset_id)

    @data_app.command("import-chasedb1")
    def import_chasedb1_cmd(
        src: Path = typer.Argument(..., help="chasedb1 folder (Image_NNX.jpg, _1stHO.png, _2ndHO.png)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to create DatasetXXX_CHASEDB1 in."),
        tile: int = typer.Option(
            128, min=16, help="Cut each fundus into TILE x TILE px crops (full resolution)."
        ),
        size: int = typer.Option(None, min=8, help="Resize every crop to SIZE x SIZE (default: keep)."),
        dataset_id: int = typer.Option(None, "--id", help="nnU-Net dataset id (default: next free >= 501)."),
    ) -> None:
        """Import CHASE_DB1 retinal vessels with BOTH observers (the second as an extra rater, for GED)."""
        from weightzoo.data.import_raters import import_chasedb1

        _run(import_chasedb1, src, out, tile=tile, size=size, dataset_id=dataset_id)

    def _folder_command(default_suffix: str, default_task: str, nifti: bool) -> Callable[..., None]:
        def command(
            src: Path = typer.Argument(..., help="Folder searched recursively for images and masks."),
            out: Path = typer.Option(..., "--out", "-o", help="Folder to create DatasetXXX_<name> in."),
            mask_suffix: str = typer.Option(default_suffix, help="Mask file = image stem + this suffix."),
            task: str = typer.Option(default_task, help="Task name of the (binarised) mask."),
            site: str = typer.Option("default", help="Site name of every case."),
            site_by_folder: bool = typer.Option(
                False, help="Site = first sub-folder of SRC holding the image."
            ),
            empty: str = typer.Option("keep", help="Empty masks: keep | skip | error."),
            strict: bool = typer.Option(
                False, help="An image without a mask is an error (default: skipped)."
            ),
            name: str = typer.Option(None, help="Dataset name (default: the folder name)."),
            dataset_id: int = typer.Option(
                None, "--id", help="nnU-Net dataset id (default: next free >= 501)."
            ),
            limit: int = typer.Option(None, min=1, help="Import only the first N image/mask pairs."),
        ) -> None:
            from weightzoo.data.importers import import_folder, import_nifti_folder

            fn = import_nifti_folder if nifti else import_folder
            _run(
                fn,
                src,
                out,
                mask_suffix,
                task,
                site,
                name=name,
                dataset_id=dataset_id,
                empty=empty,
                strict=strict,
                site_by_folder=site_by_folder,
                limit=limit,
            )

        return command

    data_app.command(
        "import-nifti",
        help="Import SCT/BIDS-style NIfTI: X.nii.gz + X<suffix>.nii.gz (e.g. _seg-manual, _label-SC_seg).",
    )(_folder_command("_seg-manual", "cord", True))
    data_app.command(
        "import-folder", help="Import images + masks X<suffix>.ext (PNG/BMP/TIFF/NIfTI), one binary task."
    )(_folder_command("_mask", "mask", False))

    @data_app.command("info")
    def info(dataset: Path = typer.Argument(..., help="A DatasetXXX_Name folder.")) -> None:
        """Show a dataset's cases, sites, subjects, tasks and split sizes."""
        ds = RawDataset.open(dataset)
        console.print(info_table(ds))
        console.print(f"path: {ds.root}", soft_wrap=True)

    app.add_typer(data_app, name="data")
