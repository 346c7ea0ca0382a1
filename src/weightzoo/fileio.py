"""Atomic file writes and JSON reads with clear errors (shared by datasets, models, zoo, reports)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from weightzoo.errors import InputError, ModelError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file a normal mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found", "check the path", p)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} is not valid JSON ({e})", "fix or re-create it", p) from None


def read_folder_description(
    folder: str | Path,
    filename: str,
    fmt: str,
    made_by: str,
    kind: str,
    required: tuple[str, ...] = (),
    schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read `folder/filename` (model.json, heads.json, generator.json), check its `format` tag and
    required keys (one-line ModelError naming the file and the command that writes such a folder),
    then its schema (`weightzoo.schemas`; default: the envelope every folder description shares)."""
    from weightzoo.schemas import FOLDER_JSON, validate

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{kind} folder not found", f"give the folder written by `{made_by}`", folder)
    meta = read_json(folder / filename, filename)
    missing = [k for k in required if k not in meta]
    if not isinstance(meta, dict) or meta.get("format") != fmt or missing:
        lacks = f" (lacks {missing[0]})" if missing else ""
        raise ModelError(
            f"{filename} is not a {fmt.replace('-', ' ')} description{lacks}",
            f"use a folder written by `{made_by}`",
            folder / filename,
        )
    fix = f"re-create the folder with `{made_by}` (or undo the edit)"
    return validate(meta, schema or FOLDER_JSON, folder / filename, fix)


def plain_name(name: object, what: str, source: str | Path | None = None) -> str:
    """`name` (read from a file) if it is safe as ONE path component, else a one-line InputError.

    Names from files (dataset, plans, trainer and configuration names, case ids, tasks, sites, run and
    checkpoint ids) become folder and file names; a crafted `../../x` or `/etc/x` must never make us
    write outside the output folder."""
    s = str(name) if isinstance(name, (str, int)) else None
    if (
        s is None
        or not s
        or s in (".", "..")
        or any(c in s for c in ("/", "\\", "\0"))
        or s.startswith("~")
        or len(s) > 200
        or any(ord(c) < 32 for c in s)
    ):
        raise InputError(
            f"{what} {name!r} is not a plain file name (no '/', '\\', '..', control characters; <= 200 chars)",
            f"rename the {what} in the file",
            source,
        )
    return s


def inside(folder: str | Path, path: str | Path) -> Path:
    """`path` resolved (symlinks followed) if it lies inside `folder`, else a one-line InputError."""
    root, p = Path(folder).resolve(), Path(path).resolve()
    if p != root and root not in p.parents:
        raise InputError("would be written outside the output folder", f"keep outputs inside {root}", path)
    return p


def check_output_file(out: str | Path, inputs: list[str | Path], fix: str = "choose another -o") -> Path:
    """Refuse, before anything is written, an output file that IS one of the inputs (resolved paths,
    symlinks and hard links included) or an existing folder."""
    p = Path(out)
    if p.is_dir():
        raise InputError("the output names an existing folder, not a file", fix, p)
    target = p.resolve()
    for i in inputs:
        q = Path(i)
        same = q.resolve() == target or (p.exists() and q.exists() and os.path.samefile(p, q))
        if same:
            raise InputError(f"the output would overwrite the input {q}", fix, p)
    return p


def check_output_folder(folder: str | Path, what: str = "output folder") -> Path:
    """A folder we are to write into must not be an existing file."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise InputError(f"the {what} is an existing file, not a folder", "give a folder", p)
    return p
