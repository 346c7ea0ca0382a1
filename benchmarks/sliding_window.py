"""3-D sliding-window inference speed: weightzoo.volume (nnU-Net's logic) vs MONAI's sliding_window_inference.

Same network (small3d, random weights, eval mode), same preprocessed volume, same patch, step 0.5
(MONAI: overlap 0.5), Gaussian weighting (MONAI: mode "gaussian", sigma_scale 0.125), one tile per
forward, no mirroring, float32 network on the CPU (and on CUDA when present). Timed in the same process,
interleaved, median of repeats after a warm-up. Ratio = ours / MONAI (goal <= 1.5). Ours runs twice:
nnU-Net's float16 accumulation (what makes it bit-identical to nnU-Net) and float32 accumulation.
Also reported: tiles per volume and max |logit difference| to MONAI (the two place tiles and weight
them differently, so they are not expected to agree exactly).

    python benchmarks/sliding_window.py                       # 64 x 192 x 192 volume, patch 32 x 128 x 128
    python benchmarks/sliding_window.py --quick               # a small volume, 1 repeat
    python benchmarks/sliding_window.py --volume sct          # ../shared/data SCT t2.nii.gz, preprocessed
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from weightzoo.nets.unet import ArchSpec, build_network
from weightzoo.volume.sliding_window import predict_sliding_window, sliding_window_slicers

SCT_T2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sct_testing_data" / "t2" / "t2.nii.gz"


def volume(kind: str, shape: tuple[int, int, int]) -> np.ndarray:
    """[1, z, y, x] float32: random (seeded) or the SCT t2 volume after z-scoring (nnU-Net order)."""
    if kind == "sct":
        from weightzoo.data.io import read_image
        from weightzoo.volume.preprocess import read_nnunet_order

        data, _ = read_nnunet_order(read_image(SCT_T2))
        return ((data - data.mean()) / data.std()).astype(np.float32)
    return np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def row(dev: str, net: torch.nn.Module, x: torch.Tensor, patch: tuple[int, ...], repeats: int) -> None:
    """One device's line of the table."""

    @torch.inference_mode()
    def monai() -> torch.Tensor:
        return sliding_window_inference(
            x[None].to(dev), patch, 1, net, overlap=0.5, mode="gaussian", sigma_scale=0.125
        )[0].float()

    def ours(dtype: torch.dtype):  # type: ignore[no-untyped-def]
        return lambda: predict_sliding_window(net, x, patch, dev, dtype=dtype).float()

    t_m, out_m = timed(monai, repeats)
    t_16, out_16 = timed(ours(torch.float16), repeats)
    t_32, _ = timed(ours(torch.float32), repeats)
    diff = float((out_16.cpu() - out_m.cpu()).abs().max())
    print(
        f"| {dev} | {t_m:.2f} | {t_16:.2f} | {t_16 / t_m:.2f} | {t_32:.2f} | {t_32 / t_m:.2f} | {diff:.3g} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volume", default="random", choices=["random", "sct"])
    p.add_argument("--shape", default="64,192,192", help="random volume [z, y, x]")
    p.add_argument("--patch", default="32,128,128", help="[z, y, x]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    patch = tuple(int(v) for v in args.patch.split(","))
    if args.quick:
        shape, patch, args.repeats = (32, 96, 96), (16, 64, 64), 1
    data = volume(args.volume, shape)  # type: ignore[arg-type]
    patch = tuple(min(p_, s) for p_, s in zip(patch, data.shape[1:], strict=True))
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    spec = ArchSpec.preset("small3d", 1, 2, patch=patch, spacing=(1.0, 1.0, 1.0))
    patch = tuple(p_ - p_ % d for p_, d in zip(patch, spec.size_divisors, strict=True))
    n_tiles = len(sliding_window_slicers(data.shape[1:], patch, 0.5))
    print(
        f"# sliding window, {datetime.date.today()}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; volume {args.volume} {list(data.shape[1:])}, patch {list(patch)}, "
        f"small3d ({sum(q.numel() for q in build_network(spec).parameters()):,} params), {n_tiles} tiles (ours)"
    )
    print(
        "| device | MONAI s | ours fp16 acc. s | ratio | ours fp32 acc. s | ratio | max abs diff to MONAI |"
    )
    print("|---|---|---|---|---|---|---|")
    for dev in devices:
        net = build_network(spec, seed=0).to(dev).eval()
        row(dev, net, torch.from_numpy(data), patch, args.repeats)


if __name__ == "__main__":
    main()
