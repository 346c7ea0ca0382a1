"""weightzoo: segmentation models for a new task or site without a week of nnU-Net training."""

from weightzoo.errors import InputError, ModelError, UnknownNameError, WeightzooError

__version__ = "0.1.0"
__all__ = ["InputError", "ModelError", "UnknownNameError", "WeightzooError", "__version__"]
