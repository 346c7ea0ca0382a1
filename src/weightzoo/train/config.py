"""The training config: every key that defines a run, checked on load (unknown keys are errors)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from weightzoo.data.slices import NORMALIZATIONS
from weightzoo.errors import InputError, UnknownNameError
from weightzoo.fileio import read_json
from weightzoo.nets.unet import PRESETS, PRESETS_3D, ArchSpec

OPTIMIZERS = ("sgd", "adam")
TRAINABLE = ("all", "decoder", "norm_seg")  # what a fine-tune of a base may change (weightzoo.zoo.base)
DEFAULT_LR = {"sgd": 1e-2, "adam": 1e-3}
# Keys that change neither the weights nor the recipe: a run may be resumed with other values.
RUN_ONLY_KEYS = ("device", "val_every", "checkpoint_every", "deterministic")


@dataclass
class TrainConfig:
    """Everything that defines a training run. `from_dict` rejects unknown keys."""

    tasks: list[str]
    preset: str = "small"
    steps: int = 1000  # iterations (batches), not epochs
    batch_size: int = 16  # 3-D presets: 2 unless given
    optimizer: str = "sgd"  # sgd (nnU-Net) | adam
    lr: float | None = None  # None: 1e-2 for sgd, 1e-3 for adam
    weight_decay: float = 3e-5
    augment: float = 1.0  # augmentation strength in [0, 1]; 0 = off
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:i]
    dropout: float = 0.0
    val_every: int = 50  # steps between validations (and log entries); the last step is always validated
    checkpoint_every: int = 50
    size: tuple[int, int] = (64, 64)
    normalization: str = "zscore"
    axis: int = 2  # canonical axis volumes are sliced along
    foreground_oversample: float = 0.33  # fraction of each batch drawn from slices with foreground
    grad_clip: float = 12.0
    amp: bool = True  # bf16 autocast, on CUDA only
    channels_last: bool = False
    deterministic: bool = True  # on CUDA: deterministic cuDNN kernels (CPU kernels already are)
    trainable: str = "all"  # fine-tunes of a base: all | decoder | norm_seg (weightzoo.zoo.base)
    # 3-D (a *3d preset): size is the patch in the NIfTI's voxel axes [i, j, k] (nibabel's shape order),
    # spacing the target spacing in mm in the same order (nibabel's zooms; None: the cases' median).
    # nnU-Net's plans hold both reversed ([z, y, x]); weightzoo.volume converts.
    spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        self._check()

    def _check(self, source: str | Path | None = None) -> None:
        def bad(what: str, fix: str) -> InputError:
            return InputError(what, fix, source)

        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        self.tasks = [str(t) for t in self.tasks]
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise bad(
                f"tasks must be a non-empty list of distinct names, got {self.tasks}",
                "e.g. tasks: [cord, gm]",
            )
        if self.preset not in PRESETS:
            raise UnknownNameError("preset", self.preset, list(PRESETS), source)
        if self.trainable not in TRAINABLE:
            raise UnknownNameError("trainable subset", self.trainable, TRAINABLE, source)
        if self.optimizer not in OPTIMIZERS:
            raise UnknownNameError("optimizer", self.optimizer, OPTIMIZERS, source)
        if self.normalization not in NORMALIZATIONS:
            raise UnknownNameError("normalization", self.normalization, NORMALIZATIONS, source)
        try:
            for name in ("steps", "batch_size", "seed", "val_every", "checkpoint_every", "axis"):
                setattr(self, name, int(getattr(self, name)))
            for name in ("weight_decay", "augment", "dropout", "foreground_oversample", "grad_clip"):
                setattr(self, name, float(getattr(self, name)))
            self.lr = None if self.lr is None else float(self.lr)
            self.size = tuple(int(v) for v in self.size)  # type: ignore[assignment]
            if self.spacing is not None:
                self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        except (TypeError, ValueError, IndexError) as e:
            raise bad(
                f"config value of the wrong type ({e})", "numbers for numeric keys, size as [H, W]"
            ) from None
        dims = self.dims
        if len(self.size) != dims:
            raise bad(
                f"size {list(self.size)} has {len(self.size)} values; preset '{self.preset}' is {dims}-D",
                "give size as [H, W] for 2-D presets, as the patch [i, j, k] for 3-D ones (e.g. --patch 64,64,32)",
            )
        if self.spacing is not None and (
            dims != 3 or len(self.spacing) != 3 or not all(0 < v < 1e3 for v in self.spacing)
        ):
            raise bad(
                f"spacing {list(self.spacing)} is not three positive mm values of a 3-D run",
                "give spacing [i, j, k] in mm with a 3-D preset, or leave it out (the cases' median)",
            )
        for name in ("amp", "channels_last", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise bad(
                    f"{name} must be true or false, got {getattr(self, name)!r}", f"set {name}: true or false"
                )
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.seed >= 0, "seed must be >= 0"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0.0 <= self.augment <= 1.0, "augment (strength) must be in [0, 1]"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (0.0 <= self.foreground_oversample <= 1.0, "foreground_oversample must be in [0, 1]"),
            (
                self.val_every >= 1 and self.checkpoint_every >= 1,
                "val_every and checkpoint_every must be >= 1",
            ),
            (self.axis in (0, 1, 2), "axis must be 0, 1 or 2"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 = off)"),
        ]
        for ok, what in checks:
            if not ok:
                raise bad(what, "fix the value in the config or on the command line")
        divs = ArchSpec.preset(
            self.preset, patch=self.size, spacing=self.spacing
        ).size_divisors  # axis order is irrelevant here
        if any(s < d or s % d for s, d in zip(self.size, divs, strict=True)):
            many = divs[0] if len(set(divs)) == 1 else list(divs)
            raise bad(
                f"size {list(self.size)} is not a multiple of {many}",
                f"preset '{self.preset}' needs multiples of {many} per axis",
            )

    @property
    def dims(self) -> int:
        return 3 if self.preset in PRESETS_3D else 2

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        if self.spacing is None:
            d.pop("spacing")  # 2-D configs and files stay as they were
        else:
            d["spacing"] = list(self.spacing)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
        """Build from a dict (a YAML/JSON config); unknown or missing keys are a one-line InputError."""
        if not isinstance(d, dict):
            raise InputError(
                f"a training config must be a mapping, got {type(d).__name__}",
                "write key: value pairs",
                source,
            )
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise InputError(
                f"unknown training config key(s) {unknown}", f"known keys: {', '.join(known)}", source
            )
        if "tasks" not in d:
            raise InputError(
                "the training config has no 'tasks'", "add tasks: [TASK, ...] or pass --task", source
            )
        cfg = cls.__new__(cls)
        defaults = {f.name: f.default for f in fields(cls)}
        if d.get("preset") in PRESETS_3D:  # nnU-Net 3d_fullres-like defaults: batch 2, 64^3 patches
            defaults.update(batch_size=2, size=(64, 64, 64))
        for f in fields(cls):
            setattr(cfg, f.name, d.get(f.name, defaults[f.name]))
        cfg._check(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a .yaml/.yml/.json config; `overrides` (e.g. command-line options) win over the file."""
        d = load_config_file(path)
        d.update(overrides or {})
        return cls.from_dict(d, source=path)

    def identity(self) -> dict[str, Any]:
        """The keys that define the trained weights (lr resolved), for comparing runs."""
        d = self.to_dict()
        d["lr"] = self.learning_rate
        for k in RUN_ONLY_KEYS:
            d.pop(k)
        if d["trainable"] == "all":
            d.pop("trainable")  # the key came with base networks: keep older runs' identities
        return d


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A config file as a dict (YAML or JSON by extension), with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise InputError("config file not found", "give a .yaml or .json training config", p)
    if p.suffix.lower() == ".json":
        d = read_json(p, "training config")
    elif p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise InputError(
                f"config is not valid YAML ({str(e).splitlines()[0]})", "fix the file", p
            ) from None
    else:
        raise InputError(f"config of unknown type '{p.suffix}'", "use .yaml, .yml or .json", p)
    if not isinstance(d, dict):
        raise InputError(
            "a training config must be a mapping of key: value", "see `weightzoo train --help`", p
        )
    return d


def config_from_options(
    config: str | Path | None,
    task: str | None,
    defaults: dict[str, Any] | None = None,
    size: int | None = None,
    **options: Any,
) -> TrainConfig:
    """A TrainConfig from a command's options: `defaults` < the --config file < the options given
    (None = not given). `task` is 'cord' or 'cord,gm'; `size` a square side."""
    opts = {k: v for k, v in options.items() if v is not None}
    if size is not None:
        opts["size"] = [size, size]
    if task is not None:
        opts["tasks"] = [t.strip() for t in task.split(",") if t.strip()]
    base = load_config_file(config) if config is not None else {}
    if "tasks" not in opts and "tasks" not in base:
        raise InputError("no task given", "add --task (e.g. --task cord) or tasks: in --config")
    return TrainConfig.from_dict({**(defaults or {}), **base, **opts}, source=config)
