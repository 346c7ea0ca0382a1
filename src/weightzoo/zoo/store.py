"""The zoo store: checkpoints as safetensors, a SQLite manifest (WAL) of runs and checkpoints.

Layout of a zoo folder:
  manifest.sqlite (+ -wal, -shm)   runs, checkpoints, per-task metrics, architectures, datasets,
                                   tensor sums for the zoo's normalisation statistics, settings
  data/<run_id>/<step>.safetensors one checkpoint per file (unsharded zoos), or
  data/<run_id>/<first>-<last>.<uid>.wzshard   several checkpoints of one run back to back (sharded
                                   zoos): each (offset, nbytes) range is a complete safetensors blob
  .writer.lock                     held (flock) by the one process allowed to write

Atomic protocol (`commit`): every file is written to a temp file, fsynced and renamed (and the
folder fsynced), and only THEN are its manifest rows inserted, all in one transaction. A kill at any
moment therefore leaves either committed rows whose files are complete, or files no row refers to
(orphans, and temp files), which the next writer deletes when it opens the zoo. Rows are unique per
(run, step), so re-committing after a restart never duplicates a checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import save as safetensors_save_numpy
from safetensors.torch import load as safetensors_load

from weightzoo.errors import InputError, ModelError, UnknownNameError
from weightzoo.fileio import atomic_write_bytes, inside, plain_name
from weightzoo.nets.unet import ArchSpec

if TYPE_CHECKING:
    from weightzoo.zoo.params import TensorStats

MANIFEST = "manifest.sqlite"
DATA_DIR = "data"
BASES_DIR = "bases"  # bases/<base_id>.safetensors: the base networks of fine-tune runs, stored once
LOCK_FILE = ".writer.lock"
ZOO_FORMAT = "weightzoo-zoo"
ZOO_VERSION = 1
SPLITS = ("train", "val", "test")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
CKPT_COLUMNS = ("step", "train_loss", "val_loss", "lr")  # checkpoint-level numbers one can filter on
SHARD_SUFFIX = ".wzshard"
CKPT_SUFFIX = ".safetensors"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS archs(arch_hash TEXT PRIMARY KEY, spec TEXT NOT NULL, n_params INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS datasets(name TEXT PRIMARY KEY, dataset_json TEXT, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs(
  run_id TEXT PRIMARY KEY, arch_hash TEXT NOT NULL REFERENCES archs(arch_hash), dataset TEXT,
  tasks TEXT NOT NULL, sites TEXT NOT NULL, seed INTEGER,
  split TEXT NOT NULL CHECK (split IN ('train', 'val', 'test')),
  status TEXT NOT NULL CHECK (status IN ('planned', 'done')), source TEXT NOT NULL,
  n_planned INTEGER NOT NULL, config TEXT NOT NULL, info TEXT NOT NULL, created REAL, finished REAL);
CREATE TABLE IF NOT EXISTS run_tasks(
  run_id TEXT NOT NULL REFERENCES runs(run_id), task TEXT NOT NULL, channel INTEGER NOT NULL,
  PRIMARY KEY (run_id, task)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_sites(
  run_id TEXT NOT NULL REFERENCES runs(run_id), site TEXT NOT NULL, PRIMARY KEY (run_id, site)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints(
  ckpt_id TEXT PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs(run_id), step INTEGER NOT NULL,
  kind TEXT NOT NULL, file TEXT NOT NULL, offset INTEGER NOT NULL, nbytes INTEGER NOT NULL,
  sha256 TEXT NOT NULL, dtype TEXT NOT NULL, train_loss REAL, val_loss REAL, lr REAL,
  info TEXT NOT NULL, created REAL, UNIQUE (run_id, step));
CREATE TABLE IF NOT EXISTS metrics(
  ckpt_id TEXT NOT NULL REFERENCES checkpoints(ckpt_id), task TEXT NOT NULL, name TEXT NOT NULL, value REAL,
  PRIMARY KEY (ckpt_id, task, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tensor_sums(
  arch_hash TEXT NOT NULL, split TEXT NOT NULL, tensor TEXT NOT NULL, n_checkpoints INTEGER NOT NULL,
  n_values INTEGER NOT NULL, sum REAL NOT NULL, sumsq REAL NOT NULL,
  PRIMARY KEY (arch_hash, split, tensor)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bases(
  base_id TEXT PRIMARY KEY, file TEXT NOT NULL, sha256 TEXT NOT NULL, model_json TEXT NOT NULL, created REAL);
CREATE INDEX IF NOT EXISTS metrics_by_value ON metrics(name, task, value);
CREATE INDEX IF NOT EXISTS ckpt_by_file ON checkpoints(file);
CREATE INDEX IF NOT EXISTS tasks_by_task ON run_tasks(task);
CREATE INDEX IF NOT EXISTS sites_by_site ON run_sites(site);
CREATE INDEX IF NOT EXISTS runs_by_split ON runs(split, status);
"""
_BASES_TABLE = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS bases") :].split(";")[0]


# ---- records ---------------------------------------------------------------------------------------
@dataclass
class PendingCheckpoint:
    """A checkpoint to commit: weights plus what was measured at that step.

    state: the network's real_state_dict (name -> tensor, any device/dtype; stored as the zoo's dtype)
    metrics: {task: {name: value}}, e.g. {"cord": {"val_dice": 0.91, "val_loss": 0.12}}; task "*" for
        numbers over all tasks (e.g. nnU-Net's ema_fg_dice). NaN is stored as NULL.
    kind: "init" | "random" | "final" for built runs; ingested nnU-Net checkpoints use "final"/"best"/"latest".
    """

    run_id: str
    step: int
    kind: str
    state: dict[str, torch.Tensor]
    train_loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    run_id: str
    arch_hash: str
    dataset: str | None
    tasks: list[str]  # output channel k is tasks[k]
    sites: list[str]
    seed: int | None
    split: str  # train | val | test: the split of runs for learning on the zoo
    status: str  # planned | done
    source: str  # build | nnunet | ...
    n_planned: int
    n_checkpoints: int
    config: dict[str, Any]
    info: dict[str, Any]


@dataclass
class CheckpointRecord:
    ckpt_id: str
    run_id: str
    step: int
    kind: str
    file: str  # relative to the zoo folder
    offset: int
    nbytes: int
    sha256: str
    dtype: str
    train_loss: float | None
    val_loss: float | None
    lr: float | None
    metrics: dict[str, dict[str, float | None]]
    info: dict[str, Any]
    tasks: list[str]
    sites: list[str]
    split: str
    arch_hash: str
    seed: int | None

    def metric(self, name: str, task: str | None = None) -> float | None:
        """A checkpoint column (`train_loss`, `val_loss`, `lr`, `step`) or a per-task metric."""
        if task is None and name in CKPT_COLUMNS:
            return getattr(self, name)
        if task is None:
            if len(self.tasks) != 1:
                raise InputError(f"'{name}' is per task and this run has tasks {self.tasks}", "name a task")
            task = self.tasks[0]
        return self.metrics.get(task, {}).get(name)


@dataclass
class VerifyReport:
    ok: bool
    n_checkpoints: int
    n_files: int
    n_bytes: int
    problems: list[str]
    notes: list[str]
    seconds: float


def ckpt_id_for(run_id: str, step: int) -> str:
    return f"{run_id}-{step:07d}"


def _num(x: float | None) -> float | None:
    """float or None; NaN -> None (SQLite would store NaN as NULL anyway, but say so explicitly)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _cast(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float tensor -> dtype; half -> float32 through numpy (single-threaded, no spinning on a busy CPU)."""
    if not v.is_floating_point() or v.dtype == dtype:
        return v
    if v.dtype == torch.float16 and dtype == torch.float32:
        return torch.from_numpy(v.numpy().astype(np.float32))
    return v.to(dtype)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the zoo ---------------------------------------------------------------------------------------
class Zoo:
    """A checkpoint zoo folder. Readers may be many; one writer at a time (`writable=True`).

    Zoo(path)                              open for reading (InputError if it is not a zoo)
    Zoo(path, create=True, writable=True)  create if absent; take the writer lock; delete orphans
    dtype ("float32" | "float16", default float32) and shard (bool, default True) are fixed when the
    zoo is created; given for an existing zoo, they must match it.
    """

    def __init__(
        self,
        path: str | Path,
        create: bool = False,
        writable: bool = False,
        dtype: str | None = None,
        shard: bool | None = None,
    ):
        self.path = Path(path)
        self.db_path = self.path / MANIFEST
        self.writable = writable or create
        self._lock_fd: int | None = None
        exists = self.db_path.exists()
        if not exists and not create:
            raise InputError(
                "not a weightzoo zoo (no manifest.sqlite)",
                "check the path, or build one with `weightzoo zoo build`",
                self.path,
            )
        if dtype is not None and dtype not in DTYPES:
            raise UnknownNameError("zoo dtype", dtype, list(DTYPES))
        self.path.mkdir(parents=True, exist_ok=True)
        if self.writable:
            self._take_lock()
        try:
            self.db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            # A creation killed before its one transaction committed leaves an empty database: create again.
            empty = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None
            if empty and create:
                self._create(dtype or "float32", True if shard is None else shard)
                exists = False
            self.settings = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            self.close()
            raise InputError(
                f"the zoo manifest cannot be read ({e})",
                "restore it from a backup or rebuild the zoo",
                self.db_path,
            ) from None
        if self.settings.get("format") != ZOO_FORMAT:
            self.close()
            raise InputError(
                "manifest.sqlite is not a weightzoo zoo manifest", "use another path", self.db_path
            )
        if exists and (
            (dtype is not None and self.dtype != dtype) or (shard is not None and self.shard != shard)
        ):
            have = f"dtype {self.dtype}, {'sharded' if self.shard else 'one file per checkpoint'}"
            self.close()
            raise InputError(
                f"the zoo exists with {have}",
                "build into it with the same settings, or use a new --zoo",
                self.path,
            )
        self._bases: dict[str, Any] = {}
        self._run_bases: dict[str, str | None] = {}
        if self.writable:
            self.db.execute(_BASES_TABLE)  # zoos made before bases existed get the table
            self.clean_orphans()

    # ---- setup ----------------------------------------------------------------------------------
    def _create(self, dtype: str, shard: bool) -> None:
        """Schema and settings in ONE transaction (SQLite DDL is transactional)."""
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            self.db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [
                    ("format", ZOO_FORMAT),
                    ("version", str(ZOO_VERSION)),
                    ("dtype", dtype),
                    ("shard", "1" if shard else "0"),
                    ("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
                ],
            )

    def _take_lock(self) -> None:
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(
                "another process is writing this zoo (its writer lock is held)",
                "wait for it to finish; a killed build releases the lock by itself",
                self.path,
            ) from None
        self._lock_fd = fd

    def writer_active(self) -> bool:
        """True if some process (this one included) holds the writer lock."""
        if self._lock_fd is not None:
            return True
        lock = self.path / LOCK_FILE
        if not lock.exists():
            return False
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases a lock we may have taken
        return False

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
            self.db = None  # type: ignore[assignment]
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Zoo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    @property
    def dtype(self) -> str:
        return self.settings.get("dtype", "float32")

    @property
    def shard(self) -> bool:
        return self.settings.get("shard", "1") == "1"

    def _tx(self) -> _Transaction:
        return _Transaction(self.db)

    def _check_writable(self) -> None:
        if not self.writable:
            raise InputError(
                "the zoo was opened read-only", "open it with Zoo(path, writable=True)", self.path
            )

    # ---- orphans --------------------------------------------------------------------------------
    def _data_files(self) -> list[Path]:
        root = self.path / DATA_DIR
        if not root.is_dir():
            return []
        return [p for p in root.rglob("*") if p.is_file()]

    def orphans(self) -> tuple[list[Path], list[Path]]:
        """(temp files, data files that no manifest row refers to) under data/."""
        referenced = {r[0] for r in self.db.execute("SELECT DISTINCT file FROM checkpoints")}
        temps, unref = [], []
        for p in self._data_files():
            rel = p.relative_to(self.path).as_posix()
            if p.name.endswith(".tmp"):
                temps.append(p)
            elif rel not in referenced:
                unref.append(p)
        return temps, unref

    def clean_orphans(self) -> int:
        """Delete temp files and unreferenced data files left by a killed writer; returns how many."""
        self._check_writable()
        temps, unref = self.orphans()
        for p in temps + unref:
            p.unlink(missing_ok=True)
        root = self.path / DATA_DIR
        if root.is_dir():
            for d in sorted((p for p in root.iterdir() if p.is_dir()), reverse=True):
                if not any(d.iterdir()):
                    d.rmdir()
        return len(temps) + len(unref)

    # ---- writing --------------------------------------------------------------------------------
    def add_arch(self, spec: ArchSpec) -> str:
        from weightzoo.nets.unet import build_network, count_parameters

        h = spec.hash()
        if self.db.execute("SELECT 1 FROM archs WHERE arch_hash = ?", (h,)).fetchone() is None:
            n = count_parameters(build_network(spec))
            with self._tx():
                self.db.execute(
                    "INSERT OR IGNORE INTO archs(arch_hash, spec, n_params) VALUES (?, ?, ?)",
                    (h, json.dumps(spec.to_dict(), sort_keys=True), n),
                )
        return h

    def add_dataset(
        self, name: str, dataset_json: dict[str, Any] | None, info: dict[str, Any] | None = None
    ) -> None:
        """Record a source dataset (its dataset.json is what `export` writes for nnU-Net)."""
        self._check_writable()
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO datasets(name, dataset_json, info) VALUES (?, ?, ?)",
                (
                    name,
                    json.dumps(dataset_json) if dataset_json is not None else None,
                    json.dumps(info or {}),
                ),
            )

    def add_run(
        self,
        run_id: str,
        spec: ArchSpec,
        tasks: Sequence[str],
        sites: Sequence[str],
        split: str,
        n_planned: int,
        config: dict[str, Any],
        seed: int | None = None,
        dataset: str | None = None,
        source: str = "build",
        info: dict[str, Any] | None = None,
    ) -> bool:
        """Register a planned run (idempotent: an existing run with the same id is kept). Returns
        True if it was new. Output channel k of the run's network is task `tasks[k]`."""
        self._check_writable()
        if split not in SPLITS:
            raise UnknownNameError("run split", split, SPLITS)
        if len(tasks) != spec.num_classes:
            raise ModelError(
                f"run {run_id} has {len(tasks)} tasks but its network {spec.num_classes} outputs"
            )
        old = self.db.execute(
            "SELECT arch_hash, tasks, n_planned FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if old is not None:
            if (old[0], json.loads(old[1]), old[2]) != (spec.hash(), list(tasks), n_planned):
                raise ModelError(
                    f"run id {run_id} is already in the zoo with another architecture, tasks or plan",
                    "use a new --zoo for a changed grid",
                    self.path,
                )
            return False
        arch = self.add_arch(spec)
        with self._tx():
            self.db.execute(
                "INSERT INTO runs(run_id, arch_hash, dataset, tasks, sites, seed, split, status, source, n_planned,"
                " config, info, created) VALUES (?, ?, ?, ?, ?, ?, ?, 'planned', ?, ?, ?, ?, ?)",
                (
                    run_id,
                    arch,
                    dataset,
                    json.dumps(list(tasks)),
                    json.dumps(sorted(sites)),
                    seed,
                    split,
                    source,
                    int(n_planned),
                    json.dumps(config, sort_keys=True),
                    json.dumps(info or {}, sort_keys=True),
                    time.time(),
                ),
            )
            self.db.executemany(
                "INSERT INTO run_tasks(run_id, task, channel) VALUES (?, ?, ?)",
                [(run_id, t, k) for k, t in enumerate(tasks)],
            )
            self.db.executemany(
                "INSERT INTO run_sites(run_id, site) VALUES (?, ?)", [(run_id, s) for s in sorted(set(sites))]
            )
        return True

    # ---- bases: fine-tune runs store deltas from one shared base (weightzoo.zoo.base) -------------
    def add_base(self, base: Any) -> str:
        """Store a weightzoo.zoo.base.BaseNet once (file first, then its row); returns its id."""
        self._check_writable()
        if self.db.execute("SELECT 1 FROM bases WHERE base_id = ?", (base.base_id,)).fetchone():
            return base.base_id
        rel = f"{BASES_DIR}/{base.base_id}{CKPT_SUFFIX}"
        atomic_write_bytes(self.path / rel, base.weights)
        _fsync_dir(self.path / BASES_DIR)
        with self._tx():
            self.db.execute(
                "INSERT INTO bases(base_id, file, sha256, model_json, created) VALUES (?, ?, ?, ?, ?)",
                (
                    base.base_id,
                    rel,
                    hashlib.sha256(base.weights).hexdigest(),
                    json.dumps(base.meta),
                    time.time(),
                ),
            )
        return base.base_id

    def base_ids(self) -> list[str]:
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'bases'").fetchone():
            return []
        return [r[0] for r in self.db.execute("SELECT base_id FROM bases ORDER BY base_id")]

    def base(self, base_id: str) -> Any:
        """A stored base as a weightzoo.zoo.base.BaseNet (checksum checked; cached)."""
        from weightzoo.zoo.base import base_from_bytes

        if base_id not in self._bases:
            if base_id not in self.base_ids():
                raise ModelError(f"base {base_id} is not in the zoo", "run `weightzoo zoo verify`", self.path)
            file, sha, meta = self.db.execute(
                "SELECT file, sha256, model_json FROM bases WHERE base_id = ?", (base_id,)
            ).fetchone()
            try:
                data = (self.path / file).read_bytes()
            except OSError as e:
                raise ModelError(
                    f"cannot read base {base_id} ({e})", "run `weightzoo zoo verify`", self.path / file
                ) from None
            if hashlib.sha256(data).hexdigest() != sha:
                raise ModelError(
                    f"base {base_id} is corrupt (sha256 mismatch)",
                    "run `weightzoo zoo verify`",
                    self.path / file,
                )
            self._bases[base_id] = base_from_bytes(data, json.loads(meta), str(self.path / file))
        return self._bases[base_id]

    def run_base(self, run_id: str) -> str | None:
        """The id of the base a run was fine-tuned from, or None (a run from a random init)."""
        if run_id not in self._run_bases:
            row = self.db.execute("SELECT info FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            self._run_bases[run_id] = json.loads(row[0]).get("base") if row else None
        return self._run_bases[run_id]

    def base_state(self, run_id: str, tasks: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """The run's base restricted to the run's tasks (its starting point), or None."""
        bid = self.run_base(run_id)
        return None if bid is None else self.base(bid).restricted(tasks)[1]

    def committed_steps(self, run_id: str) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT step FROM checkpoints WHERE run_id = ?", (run_id,))}

    def _stored(self, item: PendingCheckpoint) -> dict[str, np.ndarray]:
        """The checkpoint's tensors as stored: numpy arrays, floats in the zoo's dtype. Converted in
        numpy: torch's small casts spun intra-op threads and were ~10x slower on a busy CPU."""
        np_dt = np.float16 if self.dtype == "float16" else np.float32
        out = {}
        for k, v in item.state.items():
            v = v.detach().cpu()
            if v.is_floating_point():
                a = (v if v.dtype in (torch.float16, torch.float32, torch.float64) else v.float()).numpy()
                out[k] = np.ascontiguousarray(a, dtype=np_dt)
            else:
                out[k] = np.ascontiguousarray(v.numpy())
        return out

    def _on_disk(self, item: PendingCheckpoint, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the file holds: `stored`, or for a fine-tune of a base its delta in float32 (exact)."""
        from weightzoo.zoo.base import split_delta

        rec_tasks = json.loads(
            self.db.execute("SELECT tasks FROM runs WHERE run_id = ?", (item.run_id,)).fetchone()[0]
        )
        base = self.base_state(item.run_id, rec_tasks)
        if base is None:
            return stored
        return {k: v.numpy() for k, v in split_delta(item.state, base).items()}

    def _blob(self, item: PendingCheckpoint, arch_hash: str, arrays: dict[str, np.ndarray]) -> bytes:
        # ONE metadata key: safetensors writes its metadata map in hash order, so several keys would
        # make the bytes (and the sha256) of the same checkpoint differ between processes.
        meta = {
            "weightzoo": json.dumps(
                {
                    "format": ZOO_FORMAT,
                    "run_id": item.run_id,
                    "step": int(item.step),
                    "arch_hash": arch_hash,
                    **({"base": b} if (b := self.run_base(item.run_id)) else {}),
                },
                sort_keys=True,
            )
        }
        return safetensors_save_numpy(arrays, metadata=meta)

    def commit(self, items: Sequence[PendingCheckpoint], done_runs: Iterable[str] = ()) -> list[str]:
        """Write checkpoints (files first, atomically), then their rows in ONE transaction; mark
        `done_runs` finished in the same transaction. Already committed (run, step) pairs are skipped.
        Returns the new checkpoint ids."""
        self._check_writable()
        runs = {}
        for rid in {it.run_id for it in items} | set(done_runs):
            row = self.db.execute(
                "SELECT arch_hash, split, n_planned FROM runs WHERE run_id = ?", (rid,)
            ).fetchone()
            if row is None:
                raise ModelError(f"run {rid} is not registered in the zoo", "call add_run first", self.path)
            runs[rid] = row
        seen: set[tuple[str, int]] = set()
        todo = []
        for it in items:
            key = (it.run_id, int(it.step))
            if key in seen or int(it.step) in self.committed_steps(it.run_id):
                continue
            seen.add(key)
            todo.append(it)

        # 1. files: temp + fsync + rename (+ folder fsync), one shard per run or one file per checkpoint
        rows: list[tuple[PendingCheckpoint, str, int, int, str]] = []
        groups: dict[str, list[PendingCheckpoint]] = {}
        stored = {id(it): self._stored(it) for it in todo}
        on_disk = {id(it): self._on_disk(it, stored[id(it)]) for it in todo}
        for it in todo:
            groups.setdefault(it.run_id, []).append(it)
        for rid, its in groups.items():
            folder = self.path / DATA_DIR / plain_name(rid, "run id", self.path)
            blobs = [self._blob(it, runs[rid][0], on_disk[id(it)]) for it in its]
            if self.shard:
                steps = sorted(int(it.step) for it in its)
                rel = f"{DATA_DIR}/{rid}/{steps[0]:07d}-{steps[-1]:07d}.{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
                atomic_write_bytes(self.path / rel, b"".join(blobs))
                offset = 0
                for it, b in zip(its, blobs, strict=True):
                    rows.append((it, rel, offset, len(b), hashlib.sha256(b).hexdigest()))
                    offset += len(b)
            else:
                for it, b in zip(its, blobs, strict=True):
                    rel = f"{DATA_DIR}/{rid}/{int(it.step):07d}{CKPT_SUFFIX}"
                    atomic_write_bytes(self.path / rel, b)
                    rows.append((it, rel, 0, len(b), hashlib.sha256(b).hexdigest()))
            _fsync_dir(folder)

        # 2. manifest rows, tensor sums and run status, all or nothing
        now = time.time()
        with self._tx():
            for it, rel, offset, nbytes, sha in rows:
                cid = ckpt_id_for(it.run_id, int(it.step))
                self.db.execute(
                    "INSERT INTO checkpoints(ckpt_id, run_id, step, kind, file, offset, nbytes, sha256, dtype,"
                    " train_loss, val_loss, lr, info, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        cid,
                        it.run_id,
                        int(it.step),
                        it.kind,
                        rel,
                        offset,
                        nbytes,
                        sha,
                        self.dtype,
                        _num(it.train_loss),
                        _num(it.val_loss),
                        _num(it.lr),
                        json.dumps(it.info, sort_keys=True),
                        now,
                    ),
                )
                self.db.executemany(
                    "INSERT INTO metrics(ckpt_id, task, name, value) VALUES (?, ?, ?, ?)",
                    [(cid, t, n, _num(v)) for t, d in it.metrics.items() for n, v in d.items()],
                )
                self._add_sums(runs[it.run_id][0], runs[it.run_id][1], stored[id(it)])
            for rid in done_runs:
                n = self.db.execute("SELECT COUNT(*) FROM checkpoints WHERE run_id = ?", (rid,)).fetchone()[0]
                if n != runs[rid][2]:
                    raise ModelError(
                        f"run {rid} has {n} checkpoints, {runs[rid][2]} planned: it is not finished"
                    )
                self.db.execute("UPDATE runs SET status = 'done', finished = ? WHERE run_id = ?", (now, rid))
        return [ckpt_id_for(it.run_id, int(it.step)) for it, *_ in rows]

    def _add_sums(self, arch_hash: str, split: str, arrays: dict[str, np.ndarray]) -> None:
        """Running sums of every tensor's stored values, for `norm_stats` without re-reading files
        (float64 numpy reductions; no BLAS, whose threads spin on a busy CPU)."""
        vals = []
        for k, a in arrays.items():
            if a.dtype.kind != "f":
                continue
            x = a.astype(np.float64).ravel()
            vals.append((arch_hash, split, k, x.size, float(x.sum()), float(np.square(x).sum())))
        self.db.executemany(
            "INSERT INTO tensor_sums(arch_hash, split, tensor, n_checkpoints, n_values, sum, sumsq)"
            " VALUES (?, ?, ?, 1, ?, ?, ?) ON CONFLICT(arch_hash, split, tensor) DO UPDATE SET"
            " n_checkpoints = n_checkpoints + 1, n_values = n_values + excluded.n_values,"
            " sum = sum + excluded.sum, sumsq = sumsq + excluded.sumsq",
            vals,
        )

    def finish_run(self, run_id: str) -> None:
        """Mark a run done (it must have all its planned checkpoints)."""
        self.commit([], done_runs=[run_id])

    # ---- reading --------------------------------------------------------------------------------
    def _run_from_row(self, r: sqlite3.Row | tuple) -> RunRecord:
        return RunRecord(
            run_id=r[0],
            arch_hash=r[1],
            dataset=r[2],
            tasks=json.loads(r[3]),
            sites=json.loads(r[4]),
            seed=r[5],
            split=r[6],
            status=r[7],
            source=r[8],
            n_planned=r[9],
            config=json.loads(r[10]),
            info=json.loads(r[11]),
            n_checkpoints=r[12],
        )

    def runs(
        self,
        task: str | None = None,
        site: str | None = None,
        split: str | None = None,
        status: str | None = None,
        arch_hash: str | None = None,
        source: str | None = None,
        run_id: str | Sequence[str] | None = None,
    ) -> list[RunRecord]:
        """Runs matching every given filter, in run id order. `task`/`site`: the run learned that task /
        trained on that site (multi-task and multi-site runs match each of theirs)."""
        where, args = self._run_filters(task, site, split, status, arch_hash, source, run_id)
        sql = (
            "SELECT r.run_id, r.arch_hash, r.dataset, r.tasks, r.sites, r.seed, r.split, r.status, r.source,"
            " r.n_planned, r.config, r.info,"
            " (SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.run_id)"
            f" FROM runs r {where} ORDER BY r.run_id"
        )
        return [self._run_from_row(r) for r in self.db.execute(sql, args)]

    def run(self, run_id: str) -> RunRecord:
        found = self.runs(run_id=run_id)
        if not found:
            raise InputError(f"no run '{run_id}' in the zoo", "list runs with `weightzoo zoo ls`", self.path)
        return found[0]

    @staticmethod
    def _run_filters(
        task: str | None,
        site: str | None,
        split: str | None,
        status: str | None,
        arch_hash: str | None,
        source: str | None,
        run_id: str | Sequence[str] | None,
    ) -> tuple[str, list[Any]]:
        conds, args = [], []
        if task is not None:
            conds.append("EXISTS (SELECT 1 FROM run_tasks t WHERE t.run_id = r.run_id AND t.task = ?)")
            args.append(task)
        if site is not None:
            conds.append("EXISTS (SELECT 1 FROM run_sites s WHERE s.run_id = r.run_id AND s.site = ?)")
            args.append(site)
        if split is not None:
            if split not in SPLITS:
                raise UnknownNameError("split", split, SPLITS)
            conds.append("r.split = ?")
            args.append(split)
        for col, val in (("status", status), ("arch_hash", arch_hash), ("source", source)):
            if val is not None:
                conds.append(f"r.{col} = ?")
                args.append(val)
        if run_id is not None:
            ids = [run_id] if isinstance(run_id, str) else list(run_id)
            conds.append(f"r.run_id IN ({', '.join('?' * len(ids))})")
            args += ids
        return ("WHERE " + " AND ".join(conds)) if conds else "", args

    def checkpoints(
        self,
        task: str | None = None,
        site: str | None = None,
        split: str | None = None,
        run_id: str | Sequence[str] | None = None,
        kind: str | None = None,
        arch_hash: str | None = None,
        status: str | None = None,
        metric: str | None = None,
        min_value: float | None = None,
        max_value: float | None = None,
        order_by: str | None = None,
        limit: int | None = None,
    ) -> list[CheckpointRecord]:
        """Checkpoints matching every given filter.

        metric + min_value/max_value: a range on a checkpoint column (`step`, `train_loss`, `val_loss`,
        `lr`) or on a per-task metric (`val_dice`, ...) of `task` (of any of the run's tasks when no task
        is given). order_by: the same names, `-name` for descending (e.g. "-val_dice"); default run, step.
        """
        where, args = self._run_filters(task, site, split, status, arch_hash, None, run_id)
        conds = [where[len("WHERE ") :]] if where else []
        if kind is not None:
            conds.append("c.kind = ?")
            args.append(kind)
        if metric is not None and (min_value is not None or max_value is not None):
            lo = -math.inf if min_value is None else float(min_value)
            hi = math.inf if max_value is None else float(max_value)
            if metric in CKPT_COLUMNS and not (task is not None and self._is_task_metric(metric)):
                conds.append(f"c.{metric} BETWEEN ? AND ?")
                args += [lo, hi]
            else:
                sub = "SELECT 1 FROM metrics m WHERE m.ckpt_id = c.ckpt_id AND m.name = ? AND m.value BETWEEN ? AND ?"
                args += [metric, lo, hi]
                if task is not None:
                    sub += " AND m.task = ?"
                    args.append(task)
                conds.append(f"EXISTS ({sub})")
        where_sql = ("WHERE " + " AND ".join(conds)) if conds else ""
        order = "c.run_id, c.step"
        if order_by:
            name, desc = order_by.lstrip("-"), order_by.startswith("-")
            if name in CKPT_COLUMNS and not (task is not None and self._is_task_metric(name)):
                key = f"c.{name}"
            else:
                key = "(SELECT MAX(m.value) FROM metrics m WHERE m.ckpt_id = c.ckpt_id AND m.name = ?" + (
                    " AND m.task = ?)" if task is not None else ")"
                )
                args += ([name] + ([task] if task is not None else [])) * 2  # key appears twice below
            order = f"{key} IS NULL, {key} {'DESC' if desc else 'ASC'}, c.run_id, c.step"
        lim = f" LIMIT {int(limit)}" if limit is not None else ""
        sql = (
            "SELECT c.ckpt_id, c.run_id, c.step, c.kind, c.file, c.offset, c.nbytes, c.sha256, c.dtype,"
            " c.train_loss, c.val_loss, c.lr, c.info, r.tasks, r.sites, r.split, r.arch_hash, r.seed"
            f" FROM checkpoints c JOIN runs r ON r.run_id = c.run_id {where_sql} ORDER BY {order}{lim}"
        )
        rows = self.db.execute(sql, args).fetchall()
        metrics: dict[str, dict[str, dict[str, float | None]]] = {}
        ids = [r[0] for r in rows]
        for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[i : i + 900]
            q = f"SELECT ckpt_id, task, name, value FROM metrics WHERE ckpt_id IN ({', '.join('?' * len(chunk))})"
            for cid, t, n, v in self.db.execute(q, chunk):
                metrics.setdefault(cid, {}).setdefault(t, {})[n] = v
        return [
            CheckpointRecord(
                ckpt_id=r[0],
                run_id=r[1],
                step=r[2],
                kind=r[3],
                file=r[4],
                offset=r[5],
                nbytes=r[6],
                sha256=r[7],
                dtype=r[8],
                train_loss=r[9],
                val_loss=r[10],
                lr=r[11],
                info=json.loads(r[12]),
                tasks=json.loads(r[13]),
                sites=json.loads(r[14]),
                split=r[15],
                arch_hash=r[16],
                seed=r[17],
                metrics=metrics.get(r[0], {}),
            )
            for r in rows
        ]

    def _is_task_metric(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM metrics WHERE name = ? LIMIT 1", (name,)).fetchone() is not None

    def checkpoint(self, ckpt_id: str) -> CheckpointRecord:
        row = self.db.execute("SELECT run_id FROM checkpoints WHERE ckpt_id = ?", (ckpt_id,)).fetchone()
        if row is None:
            raise InputError(
                f"no checkpoint '{ckpt_id}' in the zoo", "list them with `weightzoo zoo ls`", self.path
            )
        return next(c for c in self.checkpoints(run_id=row[0]) if c.ckpt_id == ckpt_id)

    def spec(self, arch_hash: str) -> ArchSpec:
        row = self.db.execute("SELECT spec FROM archs WHERE arch_hash = ?", (arch_hash,)).fetchone()
        if row is None:
            raise ModelError(
                f"architecture {arch_hash} is not in the zoo", "the manifest is damaged", self.db_path
            )
        return ArchSpec.from_dict(json.loads(row[0]))

    def arch_hashes(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT arch_hash FROM archs ORDER BY arch_hash")]

    def dataset_json(self, name: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT dataset_json FROM datasets WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def dataset_path(self, name: str | None) -> Path | None:
        """The folder of dataset `name` as recorded when the zoo was built (None if unknown or gone)."""
        if name is None:
            return None
        row = self.db.execute("SELECT info FROM datasets WHERE name = ?", (name,)).fetchone()
        path = json.loads(row[0]).get("path") if row and row[0] else None
        return Path(path) if path and Path(path).is_dir() else None

    def _read_blob(self, rec: CheckpointRecord | tuple[str, int, int]) -> bytes:
        file, offset, nbytes = (
            (rec.file, rec.offset, rec.nbytes) if isinstance(rec, CheckpointRecord) else rec
        )
        p = inside(self.path, self.path / file)  # the file name comes from the manifest
        try:
            with open(p, "rb") as f:
                f.seek(offset)
                data = f.read(nbytes)
        except OSError as e:
            raise ModelError(f"cannot read checkpoint data ({e})", "run `weightzoo zoo verify`", p) from None
        if len(data) != nbytes:
            raise ModelError("checkpoint data is truncated", "run `weightzoo zoo verify`", p)
        return data

    def load(
        self, ckpt: str | CheckpointRecord, dtype: torch.dtype | None = torch.float32, check: bool = True
    ) -> dict[str, torch.Tensor]:
        """A checkpoint's state dict (the network's real_state_dict), as `dtype` (None: as stored).
        check: compare the sha256 first (a corrupt file is a ModelError, never wrong weights)."""
        rec = ckpt if isinstance(ckpt, CheckpointRecord) else self.checkpoint(ckpt)
        data = self._read_blob(rec)
        if check and hashlib.sha256(data).hexdigest() != rec.sha256:
            raise ModelError(
                f"checkpoint {rec.ckpt_id} is corrupt (sha256 mismatch)",
                "run `weightzoo zoo verify`",
                self.path / rec.file,
            )
        try:
            state = safetensors_load(data)
        except SafetensorError as e:
            raise ModelError(
                f"checkpoint {rec.ckpt_id} cannot be parsed ({e})", "run `weightzoo zoo verify`"
            ) from None
        base = self.base_state(rec.run_id, rec.tasks)
        if base is not None:
            from weightzoo.zoo.base import join_delta

            state = join_delta(state, base)
        if dtype is not None:
            state = {k: _cast(v, dtype) for k, v in state.items()}
        return state

    # ---- zoo statistics -------------------------------------------------------------------------
    def norm_stats(self, arch_hash: str | None = None, split: str = "train") -> TensorStats:
        """The zoo's normalisation statistics: per-tensor mean and std of the values of every
        checkpoint of `split` runs (maintained at commit time, so no file is re-read), as a
        weightzoo.zoo.params.TensorStats in ParamLayout order (`.normalize(layout, vectors)`)."""
        from weightzoo.zoo.params import ParamLayout, TensorStats

        if arch_hash is None:
            hashes = self.arch_hashes()
            if len(hashes) != 1:
                raise InputError(
                    f"the zoo holds {len(hashes)} architectures", f"name one: {', '.join(hashes) or '(none)'}"
                )
            arch_hash = hashes[0]
        rows = {
            r[0]: r[1:]
            for r in self.db.execute(
                "SELECT tensor, n_checkpoints, n_values, sum, sumsq FROM tensor_sums"
                " WHERE arch_hash = ? AND split = ?",
                (arch_hash, split),
            )
        }
        names = ParamLayout.for_spec(self.spec(arch_hash)).names
        if not rows or any(n not in rows for n in names):
            raise InputError(
                f"no checkpoints of architecture {arch_hash} in runs of split '{split}'",
                "build the zoo first",
            )
        n_ck = torch.tensor([rows[n][0] for n in names])
        n, s, sq = (torch.tensor([rows[k][i] for k in names], dtype=torch.float64) for i in (1, 2, 3))
        mean = s / n
        std = (sq / n - mean * mean).clamp_min(0).sqrt()
        return TensorStats(tuple(names), mean, std, int(n_ck.min()))

    def load_flat(
        self, ckpts: Sequence[str | CheckpointRecord], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Checkpoints of ONE architecture as a matrix [N, numel] in ParamLayout order."""
        from weightzoo.zoo.params import ParamLayout

        recs = [c if isinstance(c, CheckpointRecord) else self.checkpoint(c) for c in ckpts]
        hashes = {r.arch_hash for r in recs}
        if len(hashes) != 1:
            raise InputError(
                f"checkpoints of {len(hashes)} architectures", "select one architecture (arch_hash=...)"
            )
        layout = ParamLayout.for_spec(self.spec(hashes.pop()))
        return torch.stack([layout.flatten(self.load(r), dtype) for r in recs])

    def summary(
        self, task: str | None = None, site: str | None = None, split: str | None = None
    ) -> dict[str, Any]:
        """Counts, validation Dice range per task, disk size (of the runs matching task/site/split).

        tasks: {task: {runs, checkpoints, n_dice, val_dice_min, val_dice_max}}."""
        where, args = self._run_filters(task, site, split, None, None, None, None)
        runs_sql = f"SELECT r.run_id FROM runs r {where}"
        n_runs, n_done, n_planned = self.db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(status = 'done'), 0), COALESCE(SUM(n_planned), 0) FROM runs r {where}",
            args,
        ).fetchone()
        n_ckpt, nbytes = self.db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM checkpoints WHERE run_id IN ({runs_sql})", args
        ).fetchone()
        per_task: dict[str, dict[str, Any]] = {}
        for t, nr, nc in self.db.execute(
            "SELECT t.task, COUNT(*), SUM((SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = t.run_id))"
            f" FROM run_tasks t WHERE t.run_id IN ({runs_sql}) GROUP BY t.task ORDER BY t.task",
            args,
        ):
            per_task[t] = {
                "runs": nr,
                "checkpoints": nc,
                "n_dice": 0,
                "val_dice_min": None,
                "val_dice_max": None,
            }
        for t, n, lo, hi in self.db.execute(
            "SELECT m.task, COUNT(m.value), MIN(m.value), MAX(m.value) FROM metrics m JOIN checkpoints c USING (ckpt_id)"
            f" WHERE m.name = 'val_dice' AND c.run_id IN ({runs_sql}) GROUP BY m.task",
            args,
        ):
            if t in per_task:
                per_task[t].update(n_dice=n, val_dice_min=lo, val_dice_max=hi)
        splits = dict(
            self.db.execute(f"SELECT r.split, COUNT(*) FROM runs r {where} GROUP BY r.split", args).fetchall()
        )
        manifest_bytes = sum(p.stat().st_size for p in self.path.glob(MANIFEST + "*") if p.is_file())
        return {
            "runs": n_runs,
            "runs_done": n_done,
            "checkpoints": n_ckpt,
            "checkpoints_planned": n_planned,
            "splits": splits,
            "tasks": per_task,
            "data_bytes": nbytes,
            "manifest_bytes": manifest_bytes,
            "dtype": self.dtype,
            "sharded": self.shard,
        }

    # ---- verification ---------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every checksum, every manifest row against its file, and every file against the rows.

        Problems: unreadable or missing files, checksum mismatches (one flipped byte is enough),
        bytes of a file no row covers, overlapping ranges, blobs that do not parse, orphan and temp
        files (only notes while a writer holds the lock: they may be in flight), finished runs without
        all their checkpoints, and SQLite integrity errors.
        """
        t0 = time.perf_counter()
        problems: list[str] = []
        notes: list[str] = []
        integrity = self.db.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"{MANIFEST}: SQLite integrity check: {integrity}")
        for (bad,) in self.db.execute(
            "SELECT ckpt_id FROM checkpoints WHERE run_id NOT IN (SELECT run_id FROM runs)"
        ):
            problems.append(f"checkpoint {bad}: its run is not in the manifest")
        for rid, n, planned in self.db.execute(
            "SELECT r.run_id, (SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.run_id), r.n_planned"
            " FROM runs r WHERE r.status = 'done'"
        ):
            if n != planned:
                problems.append(f"run {rid}: marked done with {n} of {planned} checkpoints")
        by_file: dict[str, list[tuple[int, int, str, str]]] = {}
        for cid, file, off, nb, sha in self.db.execute(
            "SELECT ckpt_id, file, offset, nbytes, sha256 FROM checkpoints"
        ):
            by_file.setdefault(file, []).append((off, nb, sha, cid))
        n_ckpt, n_bytes = 0, 0
        for file, ranges in sorted(by_file.items()):
            p = self.path / file
            if not p.is_file():
                problems.append(f"{file}: missing ({len(ranges)} checkpoint(s) refer to it)")
                continue
            data = p.read_bytes()
            n_bytes += len(data)
            pos = 0
            for off, nb, sha, cid in sorted(ranges):
                n_ckpt += 1
                if off != pos:
                    what = "bytes no checkpoint covers" if off > pos else "overlapping checkpoints"
                    problems.append(f"{file}: {what} at offset {min(off, pos)}")
                blob = data[off : off + nb]
                if len(blob) != nb:
                    problems.append(f"{file}: checkpoint {cid} is truncated ({len(blob)} of {nb} bytes)")
                elif hashlib.sha256(blob).hexdigest() != sha:
                    problems.append(f"{file}: checkpoint {cid} fails its sha256 check (corrupt data)")
                else:
                    try:
                        safetensors_load(blob)
                    except SafetensorError as e:
                        problems.append(f"{file}: checkpoint {cid} does not parse ({e})")
                pos = max(pos, off + nb)
            if pos != len(data):
                problems.append(f"{file}: {len(data) - pos} trailing bytes no checkpoint covers")
        for bid in self.base_ids():
            file, sha = self.db.execute("SELECT file, sha256 FROM bases WHERE base_id = ?", (bid,)).fetchone()
            p = self.path / file
            if not p.is_file():
                problems.append(f"{file}: missing (base {bid} of fine-tune runs)")
            elif hashlib.sha256(p.read_bytes()).hexdigest() != sha:
                problems.append(f"{file}: base {bid} fails its sha256 check (corrupt data)")
        temps, unref = self.orphans()
        in_flight = self.writer_active()
        for p in temps + unref:
            rel = p.relative_to(self.path).as_posix()
            kind = "temp file" if p in temps else "file no manifest row refers to"
            if in_flight:
                notes.append(f"{rel}: {kind} (a writer is active: may be in flight)")
            else:
                problems.append(f"{rel}: orphan {kind} (opening the zoo for writing deletes it)")
        return VerifyReport(
            ok=not problems,
            n_checkpoints=n_ckpt,
            n_files=len(by_file),
            n_bytes=n_bytes,
            problems=problems,
            notes=notes,
            seconds=time.perf_counter() - t0,
        )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
