"""Training: nnU-Net's 2-D recipe (loss, augmentation, config, resumable loop)."""

from weightzoo.train.augment import augment_batch
from weightzoo.train.config import TrainConfig
from weightzoo.train.loop import TrainResult, train_model, train_on_slices
from weightzoo.train.losses import DiceBCELoss

__all__ = ["DiceBCELoss", "TrainConfig", "TrainResult", "augment_batch", "train_model", "train_on_slices"]
