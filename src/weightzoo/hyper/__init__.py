"""Hypernetworks: weights for a condition (a scale φ, or a site) from one training run.

    from weightzoo.hyper import HyperNet, CosSinEncoding, HyperConfig, train_hyper, hyper_segmenter
    shapes = {"conv.weight": (8, 1, 3, 3), "conv.bias": (8,)}          # what the hypernetwork generates
    hn = HyperNet(shapes, CosSinEncoding(1), theta0=init_weights)      # MIP: θ = θ₀ + Δθ(z), Δθ = 0 at init
    weights = hn(torch.rand(64, 1))                                    # {name: [64, *shape]}: one set per sample
    seg = hyper_segmenter("hyper/", scale=0.6)                         # a Segmenter for one condition

See docs/hyper.md for the parametrization, the scale-space U-Net and the measured front.
"""

from weightzoo.hyper.hypernet import CosSinEncoding, Encoding, HyperNet, RawEncoding
from weightzoo.hyper.model import (
    HyperConfig,
    HyperUNet,
    hyper_segmenter,
    is_hyper_folder,
    load_hyper,
    save_hyper,
    scale_space_spec,
)
from weightzoo.hyper.train import train_fixed_scale, train_hyper, train_hyper_on_slices

__all__ = [
    "CosSinEncoding",
    "Encoding",
    "HyperConfig",
    "HyperNet",
    "HyperUNet",
    "RawEncoding",
    "hyper_segmenter",
    "is_hyper_folder",
    "load_hyper",
    "save_hyper",
    "scale_space_spec",
    "train_fixed_scale",
    "train_hyper",
    "train_hyper_on_slices",
]
