"""Networks: nnU-Net PlainConvUNet built from an ArchSpec."""

from weightzoo.nets.unet import (
    PRESETS,
    ArchSpec,
    build_network,
    check_state_dict,
    count_parameters,
    load_real_state_dict,
    real_state_dict,
)

__all__ = [
    "PRESETS",
    "ArchSpec",
    "build_network",
    "check_state_dict",
    "count_parameters",
    "load_real_state_dict",
    "real_state_dict",
]
