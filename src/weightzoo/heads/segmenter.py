"""Inference with a heads model: the site picks the head.

    seg = load_any_model("heads/cord", site="B")      # site B's head (a plain model folder works too)
    seg.use("H")                                      # no head for H: universal head + SiteWarning
    summary = evaluate_headed("heads/cord", ds)       # each dataset site through its own head

Rules (also in docs/heads.md): a known site uses its head; an unknown site falls back to the universal
head with a `SiteWarning` that lists the known sites; no site (None) uses the universal head, silently —
the universal head was trained on all sites, so it is the right model for data of unknown origin.

3-D heads models (trained with --dims 3) are `HeadedVolumeSegmenter`s: backbone + head as a plain 3-D
network run by `VolumeSegmenter` (nnU-Net's preprocessing and sliding window on a whole NIfTI), as a
plain 3-D model folder is. `headed_segmenter` picks the class; `load_any_model` uses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import torch

from weightzoo.data.raw import RawDataset
from weightzoo.errors import ModelError
from weightzoo.heads.model import UNIVERSAL, HeadedModel, SiteWarning, is_heads_folder
from weightzoo.segmenter import (
    NetSegmenter,
    Segmenter,
    load_model,
    make_segmenter,
    read_model_json,
    resolve_device,
)
from weightzoo.volume.predictor import VolumeSegmenter


class _HeadSwap:
    """Head swapping shared by the 2-D and 3-D headed segmenters (they own `net` and `model`)."""

    model: HeadedModel
    net: torch.nn.Module
    site: str | None
    head: str
    name: str
    seconds_to_build: float
    _base: str

    def _pick(self, model: HeadedModel, site: str | None, name: str | None) -> str:
        """Record the model, the site asked for and the name base; return the head to use."""
        head = model.resolve(site)
        self.model, self.site, self.head = model, site, head
        self._base = name or (model.folder.name if model.folder is not None else "heads")
        return head

    def _seconds(self, head: str) -> float:
        """Backbone training time, plus the head's own fine-tuning time for a site head."""
        backbone = float(self.model.head_info.get(UNIVERSAL, {}).get("seconds", 0.0))
        own = float(self.model.head_info.get(head, {}).get("seconds", 0.0)) if head != UNIVERSAL else 0.0
        return backbone + own

    @torch.no_grad()
    def use(self, site: str | None) -> Self:
        """Swap in the head for `site` (see module docstring); only head tensors change."""
        head = self.model.resolve(site)
        params = dict(self.net.named_parameters()) | dict(self.net.named_buffers())
        for k, v in self.model.heads[head].items():
            params[k].copy_(v.to(params[k].device))
        self.site, self.head = site, head
        self.name, self.seconds_to_build = f"{self._base}[{head}]", self._seconds(head)
        return self


class HeadedSegmenter(_HeadSwap, NetSegmenter):
    """A NetSegmenter over backbone + one head of a 2-D heads model; `use(site)` swaps the head in place.

    predict_batch: [N, C, H, W] -> [N, K, H, W] probabilities, as every Segmenter. `head` is the head in
    use, `site` the site asked for (None: none given). 3-D models: `HeadedVolumeSegmenter`.
    """

    def __init__(
        self,
        model: HeadedModel,
        site: str | None = None,
        device: str | torch.device = "cpu",
        name: str | None = None,
    ):
        if model.preprocessing.dims == 3:
            raise ModelError(
                "a 3-D heads model segments volumes",
                "use headed_segmenter() or load_any_model()",
                model.folder,
            )
        head = self._pick(model, site, name)
        super().__init__(
            model.network(head),
            model.spec,
            model.tasks,
            model.preprocessing,
            name=f"{self._base}[{head}]",
            seconds_to_build=self._seconds(head),
            device=device,
        )


class HeadedVolumeSegmenter(_HeadSwap, VolumeSegmenter):
    """Backbone + one head of a 3-D heads model as a `VolumeSegmenter` (`segment_volume(image,
    mirror)`: nnU-Net's preprocessing and sliding window, the path of plain 3-D model folders);
    `use(site)` swaps the head in place."""

    def __init__(
        self,
        model: HeadedModel,
        site: str | None = None,
        device: str | torch.device = "cpu",
        name: str | None = None,
    ):
        head = self._pick(model, site, name)
        seg = make_segmenter(
            model.network(head),
            model.spec,
            model.tasks,
            model.preprocessing,
            f"{self._base}[{head}]",
            self._seconds(head),
            device,
        )
        assert isinstance(seg, VolumeSegmenter)
        self.__dict__.update(seg.__dict__)  # the plain 3-D segmenter's state (net, pipeline, ...)


def headed_segmenter(
    model: HeadedModel, site: str | None = None, device: str | torch.device = "cpu", name: str | None = None
) -> HeadedSegmenter | HeadedVolumeSegmenter:
    """The headed Segmenter of `model` for `site`: 2-D (slices) or 3-D (volumes), as its preprocessing."""
    cls = HeadedVolumeSegmenter if model.preprocessing.dims == 3 else HeadedSegmenter
    return cls(model, site, device, name)


def load_any_model(folder: str | Path, site: str | None = None, device: str = "auto") -> Segmenter:
    """A Segmenter for a plain model folder (model.json) or a heads folder (heads.json).

    Heads folder: the head for `site` (None: universal; unknown: universal + SiteWarning).
    Plain folder: the model itself; a `site` it was not trained on gives a SiteWarning (it still runs).
    """
    folder = Path(folder)
    if is_heads_folder(folder):
        return headed_segmenter(HeadedModel.load(folder), site, resolve_device(device))
    seg = load_model(folder, device=device)
    trained_on = read_model_json(folder).get("info", {}).get("sites")
    if site is not None and isinstance(trained_on, list) and site not in trained_on:
        warnings.warn(
            f"{folder}: a plain model (one head for all sites), trained on sites "
            f"{', '.join(map(str, trained_on)) or 'unknown'}; site '{site}' is new to it",
            SiteWarning,
            stacklevel=2,
        )
    return seg


def evaluate_headed(
    model: HeadedModel | str | Path,
    ds: RawDataset,
    split: str | None = "test",
    sites: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    threshold: float = 0.5,
    device: str = "auto",
    on_case: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate with each case routed to its dataset site's head (the dataset's `sites` map).

    Returns one summary (as `evaluate_segmenter`) over all chosen cases, plus `heads_used` {site: head}.
    """
    from weightzoo.evaluate.summary import evaluate_by_site

    hm = model if isinstance(model, HeadedModel) else HeadedModel.load(model)
    seg = headed_segmenter(hm, None, resolve_device(device))

    def segmenter_for(site: str) -> tuple[Segmenter, str]:
        seg.use(site)
        return seg, seg.head

    summary = evaluate_by_site(
        segmenter_for,
        ds,
        split,
        sites,
        tasks,
        threshold,
        on_case,
        f"{hm.folder.name if hm.folder else 'heads'} (site heads)",
    )
    summary["heads_used"] = summary.pop("used")
    return summary


def export_head(folder: str | Path, site: str, out_dir: str | Path, nnunet: bool = True) -> Path:
    """Backbone + the head of `site` ('universal' allowed) as one plain weightzoo model folder.

    With `nnunet`, the same network is also written as an nnU-Net v2 results folder inside it,
    `OUT/nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__2d/fold_0/checkpoint_final.pth`
    (via weightzoo.zoo.nnunet); a 3-D heads model gives a 3-D model folder and `..__3d_fullres`.
    model.json records the source (`info.heads_model`, `info.site`).
    Unlike inference, an unknown site is an error: an export is never silently the universal head.
    """
    from weightzoo.errors import UnknownNameError
    from weightzoo.heads.model import HEADS_JSON
    from weightzoo.segmenter import save_model

    hm = HeadedModel.load(folder)
    if site not in hm.heads:
        raise UnknownNameError("head", site, sorted(hm.heads), Path(folder) / HEADS_JSON)
    seg = headed_segmenter(hm, site, "cpu")
    info = {
        "heads_model": str(Path(folder)),
        "site": site,
        "head_stages": hm.head_stages,
        "backbone_hash": hm.backbone_hash,
        "head": hm.head_info.get(site, {}),
        "sites": [site] if site != UNIVERSAL else hm.info.get("sites", hm.sites()),
        **{k: hm.info[k] for k in ("dataset", "dataset_path", "config") if k in hm.info},
    }
    out = save_model(
        out_dir, seg.net, hm.spec, hm.tasks, hm.preprocessing, seg.seconds_to_build, route="heads", info=info
    )
    if nnunet:
        write_nnunet_export(hm, site, out / "nnUNet_results", info)
    return out


def write_nnunet_export(hm: HeadedModel, site: str, parent: Path, info: dict[str, Any]) -> Path:
    """Backbone + head `site` as an nnU-Net v2 trainer folder under `parent`; returns the .pth path."""
    from weightzoo.zoo.exchange import export_network

    desc = {k: hm.info.get(k) for k in ("channel_names", "task_labels", "file_ending")}
    desc["name"] = hm.info.get("dataset")
    return export_network(
        parent, hm.spec, hm.full_state(site), hm.tasks, hm.preprocessing, desc, info, overwrite=True
    )
