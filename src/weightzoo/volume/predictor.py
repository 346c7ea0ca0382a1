"""Predict a volume as nnU-Net v2's `nnUNetPredictor` does, and map the result onto the input's grid.

Contract
--------
`predict_volume(net, pipeline, image, device, mirror) -> probabilities [K, X, Y, Z]` float32 on the
    canonical (RAS) grid of `image` (what `weightzoo.data.io.write_like` writes back on the input's own
    grid): read in nnU-Net's axis order, `preprocess_case`, sliding window, `segmentation_from_logits`.
    K = len(pipeline.tasks): sigmoid models one channel per region; softmax models one per label,
    background first (outside nnU-Net's crop the background channel is 1, the others 0).
`segment_volume_labels(...)` the same run's label map [X, Y, Z] (uint8/uint16), as nnU-Net writes it.
`segmentation_from_logits(logits, properties, pipeline, return_probabilities)` nnU-Net's
    `convert_predicted_logits_to_segmentation_with_correct_shape`: logits (float16, preprocessed grid)
    resampled to the cropped shape with the plans' probability resampling, then sigmoid/softmax, the
    label map (regions painted in `regions_class_order`; labels by argmax -- of the logits without
    probabilities, of the probabilities with them, as nnU-Net), pasted into the uncropped shape and
    transposed back. Arrays are in nnU-Net's read order ([z, y, x] of the file).
`VolumeSegmenter` a Segmenter-like wrapper (name, tasks, n_params, seconds_to_build, preprocessing =
    the VolumePipeline) with `segment_volume(image, mirror=False)`; `volume_segmenter_from_zoo` loads
    one from a zoo checkpoint ingested from nnU-Net (plans, dataset.json, configuration in its run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightzoo.data.io import Image
from weightzoo.errors import InputError, ModelError
from weightzoo.nets.unet import ArchSpec, build_network, count_parameters, load_real_state_dict
from weightzoo.volume.preprocess import (
    VolumePipeline,
    preprocess_case,
    read_nnunet_order,
    resample,
    to_canonical,
)
from weightzoo.volume.sliding_window import predict_sliding_window


def nnunet_num_processes() -> int:
    """nnunetv2.configuration.default_num_processes: $nnUNet_def_n_proc, else 8."""
    return int(os.environ.get("nnUNet_def_n_proc", 8))  # noqa: SIM112 - nnU-Net's name


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch threads, as nnU-Net does around prediction and export: some CPU kernels
    (softmax) split work by thread, and the last float bit depends on it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def predict_logits(
    net: torch.nn.Module,
    pipeline: VolumePipeline,
    data: np.ndarray,
    device: torch.device | str,
    mirror: bool = False,
) -> torch.Tensor:
    """Preprocessed data [C, z, y, x] -> float16 logits [K, z, y, x] on the CPU (nnU-Net's
    `predict_logits_from_preprocessed_data` for one fold)."""
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    mirror_axes = pipeline.mirror_axes if mirror else None
    with torch_threads(min(nnunet_num_processes(), torch.get_num_threads())):
        return predict_sliding_window(net, x, pipeline.patch_size, device, mirror_axes).to("cpu")


def _nonlin(logits: np.ndarray, kind: str) -> torch.Tensor:  # LabelManager.apply_inference_nonlin
    x = torch.from_numpy(logits).float()
    return torch.sigmoid(x) if kind == "sigmoid" else torch.softmax(x, 0)


def _paint(probs: np.ndarray, pipeline: VolumePipeline) -> np.ndarray:
    """LabelManager.convert_probabilities_to_segmentation: regions painted in order, else argmax."""
    if pipeline.output_kind == "softmax":
        return probs.argmax(0)
    seg = np.zeros(probs.shape[1:], dtype=np.uint16)
    for i, c in enumerate(pipeline.regions_class_order or ()):
        seg[probs[i] > 0.5] = c
    return seg


def segmentation_from_logits(
    logits: torch.Tensor | np.ndarray,
    properties: dict[str, Any],
    pipeline: VolumePipeline,
    return_probabilities: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(label map [*original], probabilities [K, *original] float32 or None), nnU-Net read order."""
    with torch_threads(nnunet_num_processes()):  # as nnU-Net's export (bit-exact softmax)
        return _segmentation_from_logits(logits, properties, pipeline, return_probabilities)


def _segmentation_from_logits(
    logits: torch.Tensor | np.ndarray,
    properties: dict[str, Any],
    pipeline: VolumePipeline,
    return_probabilities: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    logits = logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    tf = pipeline.transpose_forward
    spacing_t = [properties["spacing"][i] for i in tf]
    cropped = properties["shape_after_cropping_and_before_resampling"]
    current = (
        list(pipeline.spacing) if len(pipeline.spacing) == len(cropped) else [spacing_t[0], *pipeline.spacing]
    )
    logits = resample(logits, cropped, current, spacing_t, pipeline.resampling_fn_probabilities,
                      pipeline.resampling_fn_probabilities_kwargs)  # fmt: skip  # stays float16
    probs = _nonlin(logits, pipeline.output_kind).numpy() if return_probabilities else None
    if probs is not None:
        seg = _paint(probs, pipeline)
    elif pipeline.output_kind == "sigmoid":
        seg = _paint(_nonlin(logits, "sigmoid").numpy(), pipeline)
    else:
        seg = logits.argmax(0)  # argmax of logits = of probabilities, and it skips the softmax
    n_fg = len({v for t in pipeline.tasks for v in pipeline.task_labels[t]} - {0})  # foreground_labels
    full = np.zeros(properties["shape_before_cropping"], dtype=np.uint8 if n_fg < 255 else np.uint16)
    box = tuple(slice(a, b) for a, b in properties["bbox_used_for_cropping"])
    full[box] = seg
    full = full.transpose(pipeline.transpose_backward)
    if probs is None:
        return full, None
    # LabelManager.revert_cropping_on_probabilities: background 1 outside the crop for labels
    out = np.zeros((probs.shape[0], *properties["shape_before_cropping"]), dtype=probs.dtype)
    if pipeline.output_kind == "softmax":
        out[0] = 1
    out[(slice(None), *box)] = probs
    return full, out.transpose([0, *[i + 1 for i in pipeline.transpose_backward]])


def _run(net, pipeline, image, device, mirror, return_probabilities):  # type: ignore[no-untyped-def]
    data, spacing = read_nnunet_order(image, pipeline.image_reader_writer)
    if data.shape[0] != pipeline.channels:
        raise InputError(
            f"image has {data.shape[0]} channel(s), the model expects {pipeline.channels}",
            "give one file per channel (nnU-Net _0000, _0001, ...)",
            getattr(image, "path", None),
        )
    pre, props = preprocess_case(data, spacing, pipeline)
    logits = predict_logits(net, pipeline, pre, device, mirror)
    return segmentation_from_logits(logits, props, pipeline, return_probabilities)


def predict_volume(
    net: torch.nn.Module,
    pipeline: VolumePipeline,
    image: Image,
    device: torch.device | str,
    mirror: bool = False,
) -> np.ndarray:
    """Probabilities [K, X, Y, Z] float32 on the canonical grid of `image` (a NIfTI `Image`)."""
    _, probs = _run(net, pipeline, image, device, mirror, True)
    return to_canonical(probs, image, pipeline.image_reader_writer)


def segment_volume_labels(
    net: torch.nn.Module,
    pipeline: VolumePipeline,
    image: Image,
    device: torch.device | str,
    mirror: bool = False,
) -> np.ndarray:
    """nnU-Net's label map [X, Y, Z] (as `nnUNetv2_predict` writes it, without --save_probabilities)."""
    seg, _ = _run(net, pipeline, image, device, mirror, False)
    return to_canonical(seg, image, pipeline.image_reader_writer)


def check_fits(spec: ArchSpec, pipeline: VolumePipeline, source: str | Path | None = None) -> None:
    """One-line ModelError unless the network and the pipeline belong together."""
    conv = str(spec.arch_kwargs.get("conv_op", ""))
    dim = 3 if "3d" in conv.lower() else 2
    problem = (
        f"a {dim}-D network with a {pipeline.dim}-D patch"
        if dim != pipeline.dim
        else f"{spec.input_channels} input channel(s) for {pipeline.channels} normalization scheme(s)"
        if spec.input_channels != pipeline.channels
        else f"{spec.num_classes} output channel(s) for {len(pipeline.tasks)} task(s)"
        if spec.num_classes != len(pipeline.tasks)
        else None
    )
    if problem:
        raise ModelError(
            f"network and plans do not fit ({problem})", "use the plans the network was trained with", source
        )


class VolumeSegmenter:
    """An nnU-Net-style volume model: probabilities [K, X, Y, Z] for a NIfTI `Image`.

    `tasks[k]` names output channel k; for softmax models that is every label, background first
    (`output_kind` says which)."""

    def __init__(
        self,
        net: torch.nn.Module,
        spec: ArchSpec,
        pipeline: VolumePipeline,
        tasks: list[str] | None = None,
        name: str = "nnunet",
        seconds_to_build: float = 0.0,
        device: str | torch.device = "cpu",
    ):
        check_fits(spec, pipeline)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.spec, self.pipeline, self.preprocessing = spec, pipeline, pipeline
        self.tasks = list(tasks) if tasks is not None else list(pipeline.tasks)
        if len(self.tasks) != spec.num_classes:
            raise ModelError(f"{len(self.tasks)} task names for {spec.num_classes} output channels")
        self.name, self.seconds_to_build = name, float(seconds_to_build)
        self.n_params = count_parameters(net)
        self.output_kind = pipeline.output_kind

    def predict(self, image: np.ndarray, mirror: bool = False) -> np.ndarray:
        """Already preprocessed [C, z, y, x] -> probabilities [K, z, y, x] on the same grid."""
        logits = predict_logits(self.net, self.pipeline, image, self.device, mirror).numpy()
        return _nonlin(logits, self.output_kind).numpy()

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self.predict(x) for x in images])

    def segment_volume(self, image: Image, mirror: bool = False) -> np.ndarray:
        """Probabilities [K, X, Y, Z] float32 on the canonical grid of `image`."""
        return predict_volume(self.net, self.pipeline, image, self.device, mirror)

    def segment_labels(self, image: Image, mirror: bool = False) -> np.ndarray:
        """nnU-Net's label map [X, Y, Z] on the canonical grid of `image`."""
        return segment_volume_labels(self.net, self.pipeline, image, self.device, mirror)


def volume_segmenter_from_zoo(
    zoo_path: str | Path, ckpt_id: str, device: str | torch.device = "cpu"
) -> VolumeSegmenter:
    """A VolumeSegmenter for checkpoint `ckpt_id` of a zoo run ingested from nnU-Net (its run info keeps
    plans, dataset.json, configuration and mirror axes)."""
    from weightzoo.zoo.store import Zoo

    t0 = time.perf_counter()
    with Zoo(zoo_path) as z:
        rec = z.checkpoint(ckpt_id)
        run = z.run(rec.run_id)
        info = run.info or {}
        if not all(info.get(k) for k in ("plans", "dataset_json", "configuration")):
            raise ModelError(
                f"checkpoint {ckpt_id} has no nnU-Net plans (run source: {run.source})",
                "volume inference needs a checkpoint ingested with `weightzoo zoo ingest`; use `weightzoo segment` for others",
                zoo_path,
            )
        spec = z.spec(run.arch_hash)
        state = z.load(rec)
    pipeline = VolumePipeline.from_plans(
        info["plans"], info["configuration"], info["dataset_json"], info.get("mirror_axes")
    )
    net = load_real_state_dict(build_network(spec), state)
    if list(run.tasks) != list(pipeline.tasks):
        raise ModelError(
            f"run tasks {run.tasks} differ from the plans' output channels {list(pipeline.tasks)}",
            "re-ingest the nnU-Net folder",
            zoo_path,
        )
    return VolumeSegmenter(
        net, spec, pipeline, run.tasks, name=ckpt_id, seconds_to_build=time.perf_counter() - t0, device=device
    )
