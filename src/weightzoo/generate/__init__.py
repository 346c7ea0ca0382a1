"""Weight generation: a diffusion transformer trained on a checkpoint zoo outputs trained U-Net weights
for a task, a site and a target Dice in one step; plus merging baselines for one multi-task network.

    from weightzoo.generate import GenTrainConfig, train_generator, Generator, Start
    train_generator("zoo/", "gen/", GenTrainConfig(preset="tiny"))
    gen = Generator.load("gen/")
    res = gen.sample(["cord"], {"cord": 0.95}, site="A", start=Start.from_init(7))
    gen.save(res.vectors[0], ["cord"], "net/", res.seconds, info={})

Modules: `vectors` (single- and multi-task checkpoints in one task layout), `diffusion` (the model),
`train` (pairs from the zoo's training runs; the gen/ folder), `sample` (prompting, checks, model
folders), `merge` (averaging, task arithmetic, TIES, DARE), `evaluate` (`generate eval`, the only
user of the test split), `demo` (the `weightzoo demo` section).
"""

from weightzoo.generate.diffusion import DiffusionConfig, ParamDiffusion
from weightzoo.generate.merge import METHODS as MERGE_METHODS
from weightzoo.generate.merge import merge_vectors, merge_zoo, save_merged
from weightzoo.generate.sample import Generator, SampleResult, Start, select_on_val
from weightzoo.generate.train import GenTrainConfig, train_generator
from weightzoo.generate.vectors import TaskLayout

__all__ = [
    "MERGE_METHODS",
    "DiffusionConfig",
    "GenTrainConfig",
    "Generator",
    "ParamDiffusion",
    "SampleResult",
    "Start",
    "TaskLayout",
    "merge_vectors",
    "merge_zoo",
    "save_merged",
    "select_on_val",
    "train_generator",
]
