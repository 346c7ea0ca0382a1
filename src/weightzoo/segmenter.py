"""The Segmenter contract every route ends in, and the model folder that stores one network.

Segmenter: `predict(image [C,H,W] float32) -> probabilities [K,H,W]`, with `name`, `tasks` (the K
output channels, one sigmoid channel per task), `n_params`, `seconds_to_build` and `preprocessing`.
Inputs are already preprocessed (see `weightzoo.data.slices`); `segment_image` does that for a raw
NIfTI volume or 2-D image and maps the result back onto the input's grid.

3-D models (a 3-D ArchSpec, `preprocessing.dims == 3`) are `weightzoo.volume.predictor.VolumeSegmenter`s:
they run nnU-Net's preprocessing and sliding window on a whole NIfTI (`segment_volume`), and
`segment_image` hands volumes to them.

Model folder (written by `weightzoo train`, read by `segment`, `evaluate` and later routes):
  model.json          {"format": "weightzoo-model", "version": 1, "arch": ArchSpec, "tasks": [...],
                       "preprocessing": {...}, "n_params", "seconds_to_build", "route", "info": {...}}
  model.safetensors   the network's state_dict
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from weightzoo.data.io import Image
from weightzoo.data.slices import Preprocessing, case_slices, normalize_case, resize
from weightzoo.errors import InputError, ModelError
from weightzoo.fileio import atomic_write_json, read_folder_description
from weightzoo.nets.unet import (
    ArchSpec,
    build_network,
    check_state_dict,
    count_parameters,
    load_real_state_dict,
    real_state_dict,
)

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_FORMAT = "weightzoo-model"


@runtime_checkable
class Segmenter(Protocol):
    name: str
    tasks: list[str]
    n_params: int
    seconds_to_build: float
    preprocessing: Preprocessing

    def predict(self, image: np.ndarray) -> np.ndarray: ...

    def predict_batch(self, images: np.ndarray) -> np.ndarray: ...


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu. Never hard-code a device elsewhere."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import re

    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise InputError(f"unknown device {device!r}", "use --device auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    return torch.device(device)


class NetSegmenter:
    """A PlainConvUNet with sigmoid outputs, one channel per task."""

    def __init__(
        self,
        net: torch.nn.Module,
        spec: ArchSpec,
        tasks: list[str],
        preprocessing: Preprocessing,
        name: str = "unet",
        seconds_to_build: float = 0.0,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.net = net.to(self.device).eval()
        self.spec, self.tasks, self.preprocessing = spec, list(tasks), preprocessing
        self.name, self.seconds_to_build, self.batch_size = name, float(seconds_to_build), batch_size
        self.n_params = count_parameters(net)

    @torch.no_grad()
    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """[N, C, H, W] -> [N, K, H, W] probabilities; H, W padded to the net's divisor internally."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x.ndim != 4 or x.shape[1] != self.spec.input_channels:
            raise ModelError(
                f"input of shape {tuple(x.shape)}", f"expected [N, {self.spec.input_channels}, H, W]"
            )
        h, w = x.shape[-2:]
        d = self.spec.size_divisor
        ph, pw = (-h) % d, (-w) % d
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size].to(self.device)
            if ph or pw:
                xb = torch.nn.functional.pad(
                    xb, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "constant"
                )
            out.append(torch.sigmoid(self.net(xb).float())[..., :h, :w].cpu())
        return torch.cat(out).numpy()

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.predict_batch(np.asarray(image)[None])[0]


def save_model(
    folder: str | Path,
    net: torch.nn.Module,
    spec: ArchSpec,
    tasks: list[str],
    preprocessing: Preprocessing,
    seconds_to_build: float,
    route: str = "train",
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a model folder (weights first, then model.json, both atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in real_state_dict(net).items()}
    tmp = folder / f".{MODEL_WEIGHTS}.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / MODEL_WEIGHTS)
    atomic_write_json(
        folder / MODEL_JSON,
        {
            "format": MODEL_FORMAT,
            "version": 1,
            "arch": spec.to_dict(),
            "arch_hash": spec.hash(),
            "tasks": list(tasks),
            "preprocessing": preprocessing.to_dict(),
            "n_params": count_parameters(net),
            "seconds_to_build": float(seconds_to_build),
            "route": route,
            "info": info or {},
        },
    )
    return folder


def read_model_json(folder: str | Path) -> dict[str, Any]:
    return read_folder_description(folder, MODEL_JSON, MODEL_FORMAT, "weightzoo train", "model")


def load_model(folder: str | Path, device: str = "auto") -> NetSegmenter:
    """Load a model folder as a Segmenter, with clear errors for missing/corrupt/mismatched weights."""
    t0 = time.perf_counter()
    folder = Path(folder)
    meta = read_model_json(folder)
    spec = ArchSpec.from_dict(meta["arch"], folder / MODEL_JSON)
    wpath = folder / MODEL_WEIGHTS
    if not wpath.exists():
        raise ModelError(
            "model weights are missing",
            f"the folder needs {MODEL_WEIGHTS}; re-run training or copy it",
            wpath,
        )
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(
            f"cannot read weights ({e})", "the file is corrupt; re-run training or restore it", wpath
        ) from None
    check_state_dict(spec, state, str(wpath), spec_from=MODEL_JSON)
    net = load_real_state_dict(build_network(spec), state)
    prep = Preprocessing.from_dict(meta["preprocessing"], folder / MODEL_JSON)
    if (prep.dims == 3) != (spec.dims == 3):
        raise ModelError(
            f"a {spec.dims}-D network with {prep.dims}-D preprocessing",
            "the model.json was edited; re-create the model folder",
            folder / MODEL_JSON,
        )
    return make_segmenter(
        net,
        spec,
        meta["tasks"],
        prep,
        folder.name,
        float(meta.get("seconds_to_build", time.perf_counter() - t0)),
        resolve_device(device),
    )


def make_segmenter(
    net: torch.nn.Module,
    spec: ArchSpec,
    tasks: list[str],
    preprocessing: Preprocessing,
    name: str,
    seconds_to_build: float,
    device: str | torch.device,
) -> Segmenter:
    """The Segmenter of a trained network: a NetSegmenter (2-D slices) or, for a 3-D model, a
    VolumeSegmenter running the pipeline stored in its preprocessing."""
    if preprocessing.dims != 3:
        return NetSegmenter(net, spec, tasks, preprocessing, name, seconds_to_build, device)
    from weightzoo.volume.predictor import VolumeSegmenter
    from weightzoo.volume.preprocess import VolumePipeline

    pipe = VolumePipeline.from_dict(preprocessing.pipeline or {})
    seg = VolumeSegmenter(net, spec, pipe, tasks, name, seconds_to_build, device)
    seg.preprocessing = preprocessing  # the model folder's form; seg.pipeline is the parsed one
    return seg


def segment_image(seg: Segmenter, image: Image, mirror: bool = False) -> np.ndarray:
    """Probabilities [K, *spatial] on the image's own grid (canonical orientation for volumes).

    A volume model (`segment_volume`) predicts the whole NIfTI with nnU-Net's sliding window,
    mirroring TTA with `mirror`; 2-D models go slice by slice (`mirror` does not apply)."""
    if hasattr(seg, "segment_volume"):
        if not image.is_volume:
            raise InputError(
                "a 3-D model segments NIfTI volumes, not 2-D images",
                "give a .nii/.nii.gz volume, or use a 2-D model for 2-D images",
                image.path,
            )
        return seg.segment_volume(image, mirror=mirror)
    prep = seg.preprocessing
    if image.array.shape[0] != prep.channels:
        raise InputError(
            f"image has {image.array.shape[0]} channel(s), the model expects {prep.channels}",
            "give an image of the modality the model was trained on",
            image.path,
        )
    x = case_slices(
        normalize_case(image.array, prep.normalization), prep.axis, image.is_volume
    )  # [S, C, h, w]
    h, w = x.shape[-2:]
    probs = seg.predict_batch(resize(x, prep.size).numpy())  # [S, K, H, W]
    probs = resize(probs, (h, w)).clamp_(0, 1).numpy()  # back to the slice grid
    if not image.is_volume:
        return probs[0]
    return np.moveaxis(probs, 0, prep.axis + 1)  # [K, X, Y, Z]
