"""Training throughput: images/s of one nnU-Net-recipe training step, per preset, size and precision.

A step is what `weightzoo.train.loop` runs: forward, fp32 Dice + BCE loss, backward, gradient
clipping, SGD (Nesterov 0.99) update, at batch 16. Timed after warm-up, median over repeats. On CUDA
it compares fp32 with bf16 autocast, and channels_last on/off; every ratio is relative to the fp32
baseline measured in the same run. The augmentation alone (strength 1, as in training) is timed too.

    python benchmarks/train_throughput.py            # full table (CPU, and CUDA when available)
    python benchmarks/train_throughput.py --quick    # fewer repeats, small preset only
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch

from weightzoo.nets.unet import ArchSpec, build_network, count_parameters
from weightzoo.train.augment import augment_batch
from weightzoo.train.loop import TrainConfig, make_optimizer, train_step
from weightzoo.train.losses import DiceBCELoss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, steps: int
) -> list[float]:
    """Seconds per call, one value per repeat of `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t) / steps)
    return out


def bench_train(
    preset: str,
    size: int,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    batch: int,
    timing: tuple[int, int, int],
) -> tuple[float, int]:
    """(median images/s, parameters) of the real training step."""
    spec = ArchSpec.preset(preset, input_channels=1, num_classes=1)
    net = build_network(spec, seed=0).to(device).train()
    cfg = TrainConfig(tasks=["t"], preset=preset, size=(size, size), amp=amp, channels_last=channels_last)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = make_optimizer(net, cfg)
    loss_fn = DiceBCELoss()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=g).to(device)
    y = (torch.rand(batch, 1, size, size, generator=g) > 0.8).float().to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if amp else None
    secs = timed(lambda: train_step(net, opt, loss_fn, x, y, dtype, cfg.grad_clip), device, *timing)
    return batch / statistics.median(secs), count_parameters(net)


def bench_augment(size: int, device: torch.device, batch: int, timing: tuple[int, int, int]) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=g).to(device)
    y = (torch.rand(batch, 1, size, size, generator=g) > 0.8).to(torch.uint8).to(device)
    secs = timed(lambda: augment_batch(x, y, 1.0, g), device, *timing)
    return batch / statistics.median(secs)


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small preset at 64 px, fewer repeats")
    ap.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    devices = [torch.device("cpu")] if args.device in ("all", "cpu") else []
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        raise SystemExit("no CUDA device visible; use --device cpu")
    cases = [("small", 64)] if args.quick else [("small", 64), ("default", 64), ("default", 128)]
    print(f"date: {datetime.date.today().isoformat()} · torch {torch.__version__} · batch {args.batch}")
    rows = []
    for device in devices:
        print(f"device: {device_line(device)}")
        fast = device.type == "cuda"
        for preset, size in cases:
            # CPU steps of the default preset take seconds: fewer, longer repeats there.
            timing = (5, 5, 10) if fast else ((1, 3, 2) if args.quick or preset == "default" else (2, 5, 3))
            variants = [(False, False), (False, True)] + ([(True, False), (True, True)] if fast else [])
            base = None
            for amp, cl in variants:
                ips, n_params = bench_train(preset, size, device, amp, cl, args.batch, timing)
                base = base or ips
                rows.append(
                    (device.type, preset, size, n_params, "bf16" if amp else "fp32", cl, ips, ips / base)
                )
        for size in sorted({s for _, s in cases}):
            ips = bench_augment(size, device, args.batch, (2, 5, 5))
            rows.append((device.type, "augment", size, 0, "fp32", False, ips, float("nan")))

    print()
    print("| device | preset | px | parameters | precision | channels_last | images/s | ms/step | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dev, preset, size, n_params, prec, cl, ips, ratio in rows:
        params = f"{n_params / 1e6:.2f} M" if n_params else "—"
        ratio_s = "—" if ratio != ratio else f"{ratio:.2f}×"
        cl_s = "on" if cl else "off"
        ips_s = f"{ips:,.0f}" if ips >= 100 else f"{ips:.1f}"
        ms = f"{1000 * args.batch / ips:,.0f}"
        print(f"| {dev} | {preset} | {size} | {params} | {prec} | {cl_s} | {ips_s} | {ms} | {ratio_s} |")


if __name__ == "__main__":
    main()
