"""A shared PlainConvUNet backbone with one small head per site, stored as swappable state dicts.

A head is the last `n` decoder stages (each: its transposed convolution and its conv blocks) plus the
final segmentation layer; `n = 0` is the 1x1 segmentation layer alone. Everything else (encoder, the
other decoder stages and nnU-Net's deep-supervision seg layers, unused without deep supervision) is
the backbone. The split is made on the real parameter names of the nnU-Net network, so a headed model
is simply `backbone state + {head name: head state}`, and backbone + any one head is a complete,
ordinary PlainConvUNet state dict (exportable as a plain model folder).

Heads folder (written by `weightzoo heads train`, grown by `heads add-site`):
  heads.json               {"format": "weightzoo-heads", "version": 1, "arch", "arch_hash", "tasks",
                            "preprocessing", "head_stages", "backbone_hash", "heads": {name: {"file",
                            "hash", "backbone_hash", "n_params", "bytes", "route", "val_dice", ...}},
                            "info": {...}}
  backbone.safetensors     backbone tensors
  heads/<name>.safetensors one file per head: "universal" (trained on all sites) and one per site

Adding a head writes one new file and rewrites heads.json; it never opens the backbone or another head
for writing. Every head records the hash of the backbone it was trained on, and is refused on another.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from weightzoo.data.slices import Preprocessing
from weightzoo.errors import InputError, ModelError, UnknownNameError, WeightzooWarning
from weightzoo.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    inside,
    plain_name,
    read_folder_description,
)
from weightzoo.nets.unet import (
    ArchSpec,
    build_network,
    check_state_dict,
    load_real_state_dict,
    real_state_dict,
)

HEADS_JSON = "heads.json"
HEADS_FORMAT = "weightzoo-heads"
BACKBONE_FILE = "backbone.safetensors"
HEADS_DIR = "heads"
UNIVERSAL = "universal"
SITE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")

State = dict[str, torch.Tensor]


class SiteWarning(WeightzooWarning):
    """A site has no head of its own: the universal head is used instead."""


# ---- the split --------------------------------------------------------------------------------------
def n_decoder_stages(spec: ArchSpec) -> int:
    return spec.n_stages - 1


def head_prefixes(spec: ArchSpec, head_stages: int) -> list[str]:
    """Parameter-name prefixes of a head: the last `head_stages` decoder stages + the final seg layer."""
    n_dec = n_decoder_stages(spec)
    if not 0 <= head_stages <= n_dec:
        raise InputError(
            f"head_stages={head_stages} is outside 0..{n_dec} for this network ({n_dec} decoder stages)",
            f"give --head-stages between 0 and {n_dec}",
        )
    stages = range(n_dec - head_stages, n_dec)
    return [
        *(f"decoder.transpconvs.{s}." for s in stages),
        *(f"decoder.stages.{s}." for s in stages),
        f"decoder.seg_layers.{n_dec - 1}.",
    ]


def head_names(spec: ArchSpec, head_stages: int) -> list[str]:
    """Names (in the network's real_state_dict) of the tensors that make up a head."""
    prefixes = head_prefixes(spec, head_stages)
    names = [k for k in real_state_dict(build_network(spec)) if k.startswith(tuple(prefixes))]
    return names


def split_state(state: State, names: list[str]) -> tuple[State, State]:
    """(backbone, head) parts of a full real_state_dict; `names` are the head's tensor names."""
    wanted = set(names)
    backbone = {k: v for k, v in state.items() if k not in wanted}
    head = {k: v for k, v in state.items() if k in wanted}
    return backbone, head


def state_hash(state: State) -> str:
    """Content hash of a state dict (names, dtypes, shapes, bytes): identifies a backbone."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def n_elements(state: State) -> int:
    return sum(int(v.numel()) for v in state.values())


def check_site_name(site: str) -> str:
    """Site names become file names: letters, digits, '_' and '-' only, and not 'universal'."""
    if not SITE_RE.fullmatch(site) or site == UNIVERSAL:
        raise InputError(
            f"site name {site!r} cannot name a head",
            f"use letters, digits, '_' and '-' (and not '{UNIVERSAL}')",
        )
    return site


# ---- the model --------------------------------------------------------------------------------------
@dataclass
class HeadedModel:
    """Backbone state + named head states. `network(head)` builds a plain PlainConvUNet from them.

    Tensors are kept on the CPU; `heads[UNIVERSAL]` always exists. `head_info[name]` holds what
    `heads ls` shows (route, val Dice, seconds, subjects, ...).
    """

    spec: ArchSpec
    tasks: list[str]
    preprocessing: Preprocessing
    head_stages: int
    backbone: State
    heads: dict[str, State]
    head_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    @classmethod
    def from_network(
        cls,
        net: nn.Module,
        spec: ArchSpec,
        tasks: list[str],
        preprocessing: Preprocessing,
        head_stages: int,
        info: dict[str, Any] | None = None,
    ) -> HeadedModel:
        """Split a trained network: its head part becomes the universal head."""
        state = {k: v.detach().cpu().clone() for k, v in real_state_dict(net).items()}
        backbone, head = split_state(state, head_names(spec, head_stages))
        return cls(spec, list(tasks), preprocessing, head_stages, backbone, {UNIVERSAL: head}, {}, info or {})

    @property
    def head_tensor_names(self) -> list[str]:
        return sorted(self.heads[UNIVERSAL])

    @property
    def backbone_hash(self) -> str:
        return state_hash(self.backbone)

    def sites(self) -> list[str]:
        """Sites with a head of their own (the universal head excluded)."""
        return sorted(h for h in self.heads if h != UNIVERSAL)

    def head_n_params(self, name: str) -> int:
        return n_elements(self.heads[name])

    def full_state(self, head: str) -> State:
        if head not in self.heads:
            raise UnknownNameError("head", head, sorted(self.heads), self.folder)
        return {**self.backbone, **self.heads[head]}

    def network(self, head: str = UNIVERSAL) -> nn.Module:
        """A plain PlainConvUNet with the backbone and head `head` loaded."""
        return load_real_state_dict(build_network(self.spec), self.full_state(head))

    def set_head(self, name: str, state: State, info: dict[str, Any] | None = None) -> None:
        """Add or replace a head (in memory); its tensors must be exactly the head's tensors."""
        if name != UNIVERSAL:
            check_site_name(name)
        want = set(self.heads[UNIVERSAL]) if UNIVERSAL in self.heads else set(state)
        if set(state) != want:
            raise ModelError(
                f"head '{name}' has tensors {sorted(set(state) ^ want)[:2]} that do not fit this model",
                "train the head for this model's head_stages",
            )
        self.heads[name] = {k: v.detach().cpu().clone() for k, v in state.items()}
        self.head_info[name] = dict(info or {})

    def resolve(self, site: str | None) -> str:
        """The head to use for `site`: its own, else the universal one (warning when it is unknown).

        `site=None` means "no site given": the universal head, without a warning (documented choice:
        the universal head was trained on all sites and is the best guess for an unknown scanner).
        """
        if site is None or site == UNIVERSAL:
            return UNIVERSAL
        if site in self.heads:
            return site
        where = f"{self.folder}: " if self.folder is not None else ""
        warnings.warn(
            f"{where}site '{site}' has no head; using the universal head "
            f"(known sites: {', '.join(self.sites()) or 'none'})",
            SiteWarning,
            stacklevel=2,
        )
        return UNIVERSAL

    # ---- files -------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "format": HEADS_FORMAT,
            "version": 1,
            "arch": self.spec.to_dict(),
            "arch_hash": self.spec.hash(),
            "tasks": list(self.tasks),
            "preprocessing": self.preprocessing.to_dict(),
            "head_stages": self.head_stages,
            "backbone_file": BACKBONE_FILE,
            "backbone_hash": self.backbone_hash,
            "backbone_n_params": n_elements(self.backbone),
            "heads": {},
            "info": self.info,
        }

    def save(self, folder: str | Path) -> Path:
        """Write the whole model (backbone, every head, heads.json)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        bb_hash = self.backbone_hash
        atomic_write_bytes(
            folder / BACKBONE_FILE, safetensors_bytes(_contig(self.backbone), {"backbone_hash": bb_hash})
        )
        meta = self._meta()
        for name in sorted(self.heads):
            meta["heads"][name] = self._write_head_file(folder, name, bb_hash)
        atomic_write_json(folder / HEADS_JSON, meta)
        self.folder = folder
        return folder

    def save_head(self, folder: str | Path, name: str) -> Path:
        """Write one head and update heads.json; the backbone and the other heads are not written."""
        folder = Path(folder)
        meta = read_heads_json(folder)
        if meta["backbone_hash"] != self.backbone_hash:
            raise ModelError(
                "the folder's backbone is not the one this head was trained on",
                "add the head to the model it was trained from",
                folder,
            )
        meta["heads"][name] = self._write_head_file(folder, name, meta["backbone_hash"])
        meta["info"] = self.info
        atomic_write_json(folder / HEADS_JSON, meta)
        return folder / HEADS_DIR / f"{name}.safetensors"

    def _write_head_file(self, folder: Path, name: str, bb_hash: str) -> dict[str, Any]:
        blob = safetensors_bytes(
            _contig(self.heads[name]),
            {"head": name, "head_stages": str(self.head_stages), "backbone_hash": bb_hash},
        )
        rel = f"{HEADS_DIR}/{plain_name(name, 'site name', folder)}.safetensors"
        atomic_write_bytes(folder / rel, blob)
        return {
            **self.head_info.get(name, {}),
            "file": rel,
            "hash": state_hash(self.heads[name]),
            "backbone_hash": bb_hash,
            "n_params": self.head_n_params(name),
            "bytes": len(blob),
        }

    @classmethod
    def load(cls, folder: str | Path) -> HeadedModel:
        """Read a heads folder, with one-line errors for missing/corrupt/mismatched files."""
        folder = Path(folder)
        meta = read_heads_json(folder)
        spec = ArchSpec.from_dict(meta["arch"], folder / HEADS_JSON)
        backbone = _read_tensors(
            inside(folder, folder / str(meta.get("backbone_file", BACKBONE_FILE))), "backbone"
        )
        if state_hash(backbone) != meta["backbone_hash"]:
            raise ModelError(
                "backbone weights do not match heads.json (changed or corrupt)",
                "restore the folder or retrain with `weightzoo heads train`",
                folder / BACKBONE_FILE,
            )
        heads, info = {}, {}
        for name, entry in meta["heads"].items():
            path = inside(folder, folder / str(entry["file"]))  # the name comes from heads.json
            if entry.get("backbone_hash") != meta["backbone_hash"]:
                raise ModelError(
                    f"head '{name}' was trained on another backbone",
                    f"re-create it with `weightzoo heads add-site --site {name} --force`",
                    path,
                )
            heads[name] = _read_tensors(path, f"head '{name}'")
            if state_hash(heads[name]) != entry.get("hash"):
                raise ModelError(
                    f"head '{name}' does not match heads.json (changed or corrupt)",
                    "restore it or re-create it with `weightzoo heads add-site --force`",
                    path,
                )
            info[name] = {k: v for k, v in entry.items() if k not in ("file", "hash", "backbone_hash")}
        if UNIVERSAL not in heads:
            raise ModelError("the universal head is missing", "retrain with `weightzoo heads train`", folder)
        check_state_dict(spec, {**backbone, **heads[UNIVERSAL]}, str(folder))
        expected = set(head_names(spec, int(meta["head_stages"])))
        for name, h in heads.items():
            if set(h) != expected:
                raise ModelError(
                    f"head '{name}' does not fit head_stages={meta['head_stages']}",
                    "re-create the head for this model",
                    inside(folder, folder / str(meta["heads"][name]["file"])),
                )
        return cls(
            spec,
            list(meta["tasks"]),
            Preprocessing.from_dict(meta["preprocessing"], folder / HEADS_JSON),
            int(meta["head_stages"]),
            backbone,
            heads,
            info,
            dict(meta.get("info", {})),
            folder,
        )


def _contig(state: State) -> State:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _read_tensors(path: Path, what: str) -> State:
    if not path.exists():
        raise ModelError(f"{what} weights are missing", "restore the file or retrain", path)
    try:
        state = safetensors_load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(
            f"cannot read {what} weights ({e})", "the file is corrupt; restore or retrain", path
        ) from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(f"{what} weights contain NaN or inf (first: {bad[0]})", "retrain it", path)
    return state


def is_heads_folder(folder: str | Path) -> bool:
    return (Path(folder) / HEADS_JSON).is_file()


def read_heads_json(folder: str | Path) -> dict[str, Any]:
    required = ("arch", "tasks", "preprocessing", "head_stages", "backbone_hash", "heads")
    return read_folder_description(
        folder, HEADS_JSON, HEADS_FORMAT, "weightzoo heads train", "heads model", required
    )
