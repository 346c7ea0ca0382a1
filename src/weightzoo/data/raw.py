"""The nnU-Net v2 raw dataset format, read and written, plus weightzoo's extra keys.

A dataset is a folder `DatasetXXX_Name/` with
  dataset.json                   nnU-Net keys: channel_names, labels (regions allowed), numTraining, file_ending
  imagesTr/CASE_0000.ext ...     one file per channel (an RGB PNG is one file with 3 channels, as in nnU-Net)
  labelsTr/CASE.ext              integer label map
weightzoo adds keys to dataset.json that nnU-Net ignores:
  "sites":    {case: site}       acquisition site (hospital, scanner, contrast) of each case
  "subjects": {case: subject}    subject of each case (splits never separate a subject's cases)
  "tasks":    {task: [labels]}   each binary task as the set of label values that make its foreground
and a file `weightzoo_splits.json` with train/val/test **subject** lists, made once and stored with the
dataset so every route is trained, selected and tested on the same subjects.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightzoo.errors import InputError, UnknownNameError
from weightzoo.fileio import atomic_write_json, read_json
from weightzoo.schemas import DATASET_JSON, SPLITS_JSON, validate

SPLITS_FILE = "weightzoo_splits.json"
RATERS_DIR = "labelsRaters"
SPLIT_NAMES = ("train", "val", "test")
DATASET_DIR_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")


def tasks_from_labels(labels: dict[str, Any]) -> dict[str, list[int]]:
    """Binary tasks implied by nnU-Net `labels`: each non-background label (or region) is a task."""
    tasks = {}
    for name, value in labels.items():
        vals = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if name != "background" and vals != [0]:
            tasks[name] = vals
    return tasks


@dataclass
class RawDataset:
    """An nnU-Net raw dataset folder with weightzoo's site/subject/task metadata."""

    root: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> RawDataset:
        root = Path(root)
        if not root.is_dir():
            raise InputError(
                "dataset folder not found",
                "give an nnU-Net raw folder DatasetXXX_Name (see `weightzoo data --help`)",
                root,
            )
        path = root / "dataset.json"
        meta = validate(
            read_json(path, "dataset.json"),
            DATASET_JSON,
            path,
            "fix the file: it must follow nnU-Net v2's dataset.json format (docs/data.md)",
        )
        defined = {v for vs in meta["labels"].values() for v in (vs if isinstance(vs, list) else [vs])}
        for task, values in meta.get("tasks", {}).items():
            if missing := [v for v in values if v not in defined or v == 0]:
                raise InputError(
                    f"task '{task}' uses label value {missing[0]}, which is background or not in 'labels'",
                    "give each task foreground label values listed under 'labels'",
                    path,
                )
        return cls(root, meta)

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.name

    @property
    def file_ending(self) -> str:
        return str(self.meta["file_ending"])

    @property
    def n_channels(self) -> int:
        """Input channels: one per channel_names entry (an RGB PNG counts 3, as in nnU-Net)."""
        return len(self.meta["channel_names"])

    @property
    def n_files_per_case(self) -> int:
        # nnU-Net stores RGB natural images as one file holding all channels.
        rgb = [str(v).upper() for v in self.meta["channel_names"].values()] == ["R", "G", "B"]
        return 1 if rgb else self.n_channels

    @property
    def tasks(self) -> dict[str, list[int]]:
        return {
            k: [int(v) for v in vs]
            for k, vs in self.meta.get("tasks", tasks_from_labels(self.meta["labels"])).items()
        }

    @property
    def n_raters(self) -> int:
        """Extra annotations per case (`raters` in dataset.json): labelsRaters/<case>_r<k>, k = 1..n.
        labelsTr is the reference annotation every metric other than GED uses."""
        return int(self.meta.get("raters", 0))

    def rater_label_file(self, case: str, rater: int) -> Path:
        """Label file of annotation `rater` (0: labelsTr, the reference; 1..n_raters: labelsRaters)."""
        if rater == 0:
            return self.label_file(case)
        if not 1 <= rater <= self.n_raters:
            raise InputError(
                f"annotation {rater} asked for; the dataset has {self.n_raters} extra rater(s)",
                "give a rater in 0..n (dataset.json 'raters')",
                self.root / "dataset.json",
            )
        return self.root / RATERS_DIR / f"{case}_r{rater}{self.file_ending}"

    def task_labels(self, task: str) -> list[int]:
        tasks = self.tasks
        if task not in tasks:
            raise UnknownNameError("task", task, list(tasks), self.root / "dataset.json")
        return tasks[task]

    def cases(self) -> list[str]:
        """Case identifiers, from labelsTr (sorted)."""
        labels_dir = self.root / "labelsTr"
        if not labels_dir.is_dir():
            raise InputError(
                "labelsTr/ is missing", "an nnU-Net raw dataset needs imagesTr/ and labelsTr/", self.root
            )
        end = self.file_ending
        return sorted(
            p.name[: -len(end)]
            for p in labels_dir.iterdir()
            if p.name.endswith(end) and not p.name.startswith(".")
        )

    def site(self, case: str) -> str:
        return str(self.meta.get("sites", {}).get(case, "default"))

    def subject(self, case: str) -> str:
        return str(self.meta.get("subjects", {}).get(case, case))

    def sites(self) -> list[str]:
        return sorted({self.site(c) for c in self.cases()})

    def check_site(self, site: str) -> str:
        if site not in self.sites():
            raise UnknownNameError("site", site, self.sites(), self.root / "dataset.json")
        return site

    def image_files(self, case: str) -> list[Path]:
        files = [
            self.root / "imagesTr" / f"{case}_{i:04d}{self.file_ending}" for i in range(self.n_files_per_case)
        ]
        for f in files:
            if not f.exists():
                raise InputError(
                    "image file of a labelled case is missing",
                    f"add it or remove labelsTr/{case}{self.file_ending}",
                    f,
                )
        return files

    def label_file(self, case: str) -> Path:
        return self.root / "labelsTr" / f"{case}{self.file_ending}"

    # ---- splits (by subject) --------------------------------------------------------------------
    def splits(self) -> dict[str, list[str]]:
        """Subject lists per split; created (seed 0, 60/20/20 per site) and stored if absent, so every
        later run sees the same split. A read-only dataset gets the same default split in memory."""
        path = self.root / SPLITS_FILE
        if not path.exists():
            default = make_splits(self, seed=0)
            try:
                write_splits(self, default)
            except OSError as e:
                import warnings

                from weightzoo.errors import WeightzooWarning

                warnings.warn(
                    f"{path}: cannot store the default split ({e.strerror or e}); using it in memory "
                    "(deterministic: seed 0); copy the dataset somewhere writable to keep a split file.",
                    WeightzooWarning,
                    stacklevel=2,
                )
                return {k: list(default[k]) for k in SPLIT_NAMES}
        s = validate(
            read_json(path, SPLITS_FILE),
            SPLITS_JSON,
            path,
            "give train/val/test lists of subject names, or delete the file to re-create the default split",
        )
        seen: dict[str, str] = {}
        for k in SPLIT_NAMES:
            for subject in s[k]:
                if subject in seen and seen[subject] != k:  # a test leak (or a train/val one)
                    raise InputError(
                        f"subject '{subject}' is in both the {seen[subject]} and the {k} split",
                        "put every subject in exactly one split",
                        path,
                    )
                seen[subject] = k
        return {k: list(s[k]) for k in SPLIT_NAMES}

    def cases_in(self, split: str | None = None, sites: Iterable[str] | None = None) -> list[str]:
        """Cases of a split ('train', 'val', 'test' or None for all) and of the given sites."""
        cases = self.cases()
        if split is not None:
            if split not in SPLIT_NAMES:
                raise UnknownNameError("split", split, SPLIT_NAMES)
            subjects = set(self.splits()[split])
            cases = [c for c in cases if self.subject(c) in subjects]
        if sites is not None:
            wanted = {self.check_site(s) for s in sites}
            cases = [c for c in cases if self.site(c) in wanted]
        return cases


def make_splits(
    ds: RawDataset, seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2)
) -> dict[str, Any]:
    """Split subjects (never cases) into train/val/test, separately within each site.

    Each site with ≥ 3 subjects gets at least one subject in every split, so per-site test
    figures always exist; a site with fewer subjects goes to train first.
    """
    by_site: dict[str, set[str]] = {}
    for c in ds.cases():
        by_site.setdefault(ds.site(c), set()).add(ds.subject(c))
    seen: dict[str, str] = {}
    for site, subs in by_site.items():
        for s in subs:
            if s in seen and seen[s] != site:
                raise InputError(
                    f"subject {s} appears in sites {seen[s]} and {site}",
                    "a subject must belong to one site",
                    ds.root,
                )
            seen[s] = site
    rng = random.Random(seed)
    out: dict[str, Any] = {
        "by": "subject",
        "seed": seed,
        "fractions": list(fractions),
        "train": [],
        "val": [],
        "test": [],
    }
    for site in sorted(by_site):
        subs = sorted(by_site[site])
        rng.shuffle(subs)
        n = len(subs)
        n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
        n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
        out["test"] += subs[:n_test]
        out["val"] += subs[n_test : n_test + n_val]
        out["train"] += subs[n_test + n_val :]
    for k in SPLIT_NAMES:
        out[k] = sorted(out[k])
    return out


def write_splits(ds: RawDataset, splits: dict[str, Any]) -> Path:
    return atomic_write_json(ds.root / SPLITS_FILE, splits)


class RawDatasetWriter:
    """Create a standard nnU-Net raw dataset, case by case; `finish()` writes dataset.json + splits.

    >>> w = RawDatasetWriter(out_dir, 501, "Phantom", {"0": "T2"}, {"background": 0, "cord": 1}, ".nii.gz")
    >>> w.add_case("ph_001", [volume], label, site="A", subject="sub-001", affine=affine)
    >>> ds = w.finish()
    """

    def __init__(
        self,
        parent: str | Path,
        dataset_id: int,
        name: str,
        channel_names: dict[str, str],
        labels: dict[str, Any],
        file_ending: str,
        tasks: dict[str, list[int]] | None = None,
        description: str = "",
        extra: dict[str, Any] | None = None,
    ):
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise InputError(
                f"dataset name {name!r} has characters nnU-Net does not allow", "use letters, digits, _ and -"
            )
        if not 1 <= dataset_id <= 999:
            raise InputError(f"dataset id {dataset_id} outside 1..999", "nnU-Net ids have three digits")
        self.root = Path(parent) / f"Dataset{dataset_id:03d}_{name}"
        (self.root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (self.root / "labelsTr").mkdir(parents=True, exist_ok=True)
        self.meta: dict[str, Any] = {
            "channel_names": channel_names,
            "labels": labels,
            "numTraining": 0,
            "file_ending": file_ending,
            "name": name,
            "description": description,
            "tasks": tasks if tasks is not None else tasks_from_labels(labels),
            "sites": {},
            "subjects": {},
        }
        if extra:
            self.meta.update(extra)

    def add_case(
        self,
        case: str,
        images: Sequence[np.ndarray],
        label: np.ndarray,
        site: str = "default",
        subject: str | None = None,
        affine: np.ndarray | None = None,
        raters: Sequence[np.ndarray] = (),
    ) -> None:
        """Add one case: `images` one array per file (3-D volume, or 2-D [H,W] / channel-first [3,H,W] for PNG);
        `raters`: extra annotations of the case (labelsRaters/<case>_r1, _r2, ...), as many for every case."""
        from weightzoo.data.io import save_nifti, write_2d

        end = self.meta["file_ending"]
        for i, img in enumerate(images):
            path = self.root / "imagesTr" / f"{case}_{i:04d}{end}"
            if end in (".nii.gz", ".nii"):
                save_nifti(path, np.asarray(img, dtype=np.float32), affine)
            else:
                write_2d(path, np.asarray(img))

        def write_label(path: Path, lab: np.ndarray) -> None:
            if end in (".nii.gz", ".nii"):
                save_nifti(path, np.asarray(lab, dtype=np.uint8), affine)
            else:
                write_2d(path, np.asarray(lab, dtype=np.uint8))

        write_label(self.root / "labelsTr" / f"{case}{end}", label)
        if raters or "raters" in self.meta:
            if self.meta.setdefault("raters", len(raters)) != len(raters):
                raise ValueError(
                    f"case {case}: {len(raters)} rater annotations, others have {self.meta['raters']}"
                )
            (self.root / RATERS_DIR).mkdir(exist_ok=True)
            for k, lab in enumerate(raters, start=1):
                write_label(self.root / RATERS_DIR / f"{case}_r{k}{end}", lab)
        self.meta["sites"][case] = site
        self.meta["subjects"][case] = subject or case

    def finish(self, split_seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> RawDataset:
        self.meta["numTraining"] = len(self.meta["subjects"])
        atomic_write_json(self.root / "dataset.json", self.meta)
        ds = RawDataset(self.root, self.meta)
        write_splits(ds, make_splits(ds, split_seed, fractions))
        return ds


def next_dataset_id(parent: str | Path, start: int = 501) -> int:
    """First free DatasetXXX id at or after `start` in `parent` (nnU-Net reserves < 500 for its own)."""
    used = set()
    p = Path(parent)
    if p.is_dir():
        for d in p.iterdir():
            m = DATASET_DIR_RE.match(d.name)
            if m:
                used.add(int(m.group(1)))
    i = start
    while i in used:
        i += 1
    return i
