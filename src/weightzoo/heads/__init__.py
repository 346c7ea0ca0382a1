"""Site heads: a shared PlainConvUNet backbone with a small head per site (see docs/heads.md).

from weightzoo.heads import train_heads, add_site, load_any_model
train_heads("data/Dataset501_Phantom", TrainConfig(tasks=["cord"], preset="tiny"), "heads/cord")
add_site("heads/cord", "data/Dataset502_New", site="H", shots=10)
seg = load_any_model("heads/cord", site="B")     # a Segmenter; unknown site -> universal + warning
3-D: a config with a 3-D preset (tiny3d, small3d, default3d; size = the patch) trains on volumes.
"""

from weightzoo.heads.model import (
    UNIVERSAL,
    HeadedModel,
    SiteWarning,
    head_names,
    head_prefixes,
    is_heads_folder,
    split_state,
)
from weightzoo.heads.segmenter import (
    HeadedSegmenter,
    HeadedVolumeSegmenter,
    evaluate_headed,
    headed_segmenter,
    load_any_model,
)
from weightzoo.heads.train import (
    HeadsResult,
    add_site,
    head_sizes,
    joint_unfreeze,
    train_backbone,
    train_heads,
    train_site_head,
)

__all__ = [
    "UNIVERSAL",
    "HeadedModel",
    "HeadedSegmenter",
    "HeadedVolumeSegmenter",
    "HeadsResult",
    "SiteWarning",
    "add_site",
    "evaluate_headed",
    "head_names",
    "head_prefixes",
    "head_sizes",
    "headed_segmenter",
    "is_heads_folder",
    "joint_unfreeze",
    "load_any_model",
    "split_state",
    "train_backbone",
    "train_heads",
    "train_site_head",
]
