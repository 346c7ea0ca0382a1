"""JSON Schemas of the files weightzoo reads, and `validate`: one-line errors naming file, key and fix.

Every JSON file that comes from outside a running process (dataset.json, weightzoo_splits.json,
model.json, heads.json, generator.json) is checked against its schema here, right after it is
parsed and before any value is used to size, allocate or name anything. The schemas hold types,
ranges and caps; names that become path components must be plain (no '/', '\\', '..', control
characters). Checks that need more than one file (a task's labels exist in dataset.json, an
architecture's sizes) stay next to the code that knows them (`check_arch_kwargs`,
`Preprocessing.from_dict`). jsonschema (Draft 2020-12) does the walking: a well-kept library, and the
schemas double as documentation of the formats (docs/safety.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightzoo.errors import InputError

MAX_LABEL = 255  # masks are stored as uint8
MAX_CHANNELS = 64
MAX_NAME = 200

# A name that becomes a file or folder name (task, site, subject, case, run id).
PLAIN_NAME: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME,
    "pattern": r"^[^/\\\x00-\x1f~][^/\\\x00-\x1f]*$",
    "not": {"enum": [".", ".."]},
}
LABEL_VALUE: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_LABEL}
LABEL_VALUES: dict[str, Any] = {
    "type": "array",
    "items": LABEL_VALUE,
    "minItems": 1,
    "maxItems": MAX_LABEL + 1,
}
FINITE: dict[str, Any] = {"type": "number", "finite": True}  # Python's json reads NaN and Infinity

DATASET_JSON: dict[str, Any] = {
    "type": "object",
    "required": ["channel_names", "labels", "file_ending"],
    "properties": {
        "channel_names": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": MAX_CHANNELS,
            "propertyNames": {"pattern": r"^[0-9]+$"},
            "additionalProperties": {"type": "string", "maxLength": MAX_NAME},
        },
        "labels": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": MAX_LABEL + 1,
            "additionalProperties": {"anyOf": [LABEL_VALUE, LABEL_VALUES]},
        },
        "file_ending": {"enum": [".nii.gz", ".nii", ".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg"]},
        "numTraining": {"type": "integer", "minimum": 0},
        "tasks": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": PLAIN_NAME,
            "additionalProperties": LABEL_VALUES,
        },
        "sites": {"type": "object", "additionalProperties": PLAIN_NAME},
        "subjects": {"type": "object", "additionalProperties": PLAIN_NAME},
        "raters": {"type": "integer", "minimum": 0, "maximum": 64},
        "name": {"type": "string"},
    },
    # nnU-Net's format has optional keys of its own (regions_class_order, overwrite_image_reader_writer,
    # ...) and importers add notes: other keys are kept and never read by weightzoo.
}

SPLITS_JSON: dict[str, Any] = {
    "type": "object",
    "required": ["train", "val", "test"],
    "properties": {k: {"type": "array", "items": PLAIN_NAME} for k in ("train", "val", "test")},
}


# zoo grids (YAML or JSON): types here; meaning (unknown task, caps on the runs planned, a base's fixed
# keys) in weightzoo.zoo.grid. Axes take one value or a list of values.
def _one_or_list(item: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": 1, "maxItems": 1000}]}


# PyYAML reads `1e-3` (no dot) as a string; TrainConfig converts it, so a grid may write numbers so
_NUMBER_TEXT: dict[str, Any] = {"type": "string", "pattern": r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"}


def _number(**bounds: Any) -> dict[str, Any]:
    return {"anyOf": [{**FINITE, **bounds}, _NUMBER_TEXT]}


_NAMES_ENTRY: dict[str, Any] = {"anyOf": [PLAIN_NAME, {"type": "array", "items": PLAIN_NAME, "minItems": 1}]}
_INT: dict[str, Any] = {"type": "integer"}
GRID_JSON: dict[str, Any] = {
    "type": "object",
    "required": ["tasks"],
    "properties": {
        "tasks": {"anyOf": [PLAIN_NAME, {"type": "array", "items": _NAMES_ENTRY, "minItems": 1}]},
        "sites": {"anyOf": [PLAIN_NAME, {"type": "array", "items": _NAMES_ENTRY, "minItems": 1}]},
        "seeds": _one_or_list(_INT),
        "checkpoints": {"type": "integer", "minimum": 0, "maximum": 10_000},
        "split_seed": _INT,
        "run_split": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"enum": ["train", "val", "test"]},
            "additionalProperties": {**FINITE, "minimum": 0, "maximum": 1},
        },
        "name": {"type": "string"},
        "from": {"type": "string"},
        "preset": _one_or_list({"type": "string"}),
        "trainable": _one_or_list({"type": "string"}),
        "optimizer": _one_or_list({"type": "string"}),
        "lr": _one_or_list(_number(exclusiveMinimum=0)),
        "weight_decay": _one_or_list(_number(minimum=0)),
        "augment": _one_or_list(_number(minimum=0, maximum=1)),
        "steps": _one_or_list({"type": "integer", "minimum": 1}),
        "epochs": _one_or_list({"type": "integer", "minimum": 1}),
        "batch_size": _one_or_list({"type": "integer", "minimum": 1}),
        "dropout": _one_or_list(_number(minimum=0, maximum=1)),
        "size": _one_or_list({"type": "integer", "minimum": 1}),
        "normalization": {"type": "string"},
        "axis": {"type": "integer", "minimum": 0, "maximum": 2},
        "foreground_oversample": _number(minimum=0, maximum=1),
        "grad_clip": _number(minimum=0),
    },
}

# model.json / heads.json / generator.json: the envelope every folder description shares. The
# architecture and preprocessing inside are checked by check_arch_kwargs and Preprocessing.from_dict.
_TASKS: dict[str, Any] = {"type": "array", "items": PLAIN_NAME, "minItems": 1, "maxItems": 64}
FOLDER_JSON: dict[str, Any] = {
    "type": "object",
    "required": ["format"],
    "properties": {
        "format": {"type": "string"},
        "version": {"type": "integer", "minimum": 1},
        "tasks": _TASKS,
        "preprocessing": {"type": "object"},
        "threshold": FINITE,
        "arch": {"type": "object"},
        "arch_hash": {"type": "string"},
        "n_params": {"type": "integer", "minimum": 0},
        "seconds_to_build": {**FINITE, "minimum": 0},
        "route": {"type": "string"},
        "info": {"type": "object"},
        # heads.json
        "head_stages": {"type": "integer", "minimum": 0, "maximum": 10},
        "backbone_hash": {"type": "string"},
        "backbone_file": {"type": "string"},
        "heads": {"type": "object", "additionalProperties": {"type": "object"}},
    },
}
GENERATOR_JSON: dict[str, Any] = {
    "allOf": [{"$ref": "#/$defs/folder"}],
    "$defs": {"folder": FOLDER_JSON},
    "required": ["format", "version", "tasks", "preprocessing"],
    "properties": {
        "version": {"enum": [1, 2]},
        "kind": {"enum": ["gpt", "delta"]},
    },
    "if": {"properties": {"kind": {"const": "delta"}}, "required": ["kind"]},
    "then": {
        "required": ["base_id", "base_model", "subset", "numel", "emb_dim", "config", "sites", "rms_range"],
        "properties": {
            "base_id": {"type": "string"},
            "base_model": {
                "type": "object",
                "required": ["arch", "tasks"],
                "properties": {"arch": {"type": "object"}, "tasks": _TASKS},
            },
            "subset": {"type": "string"},
            "numel": {"type": "integer", "minimum": 1, "maximum": 50_000_000},
            "emb_dim": {"type": "integer", "minimum": 1, "maximum": 65_536},
            "config": {
                "type": "object",
                "required": ["hidden", "depth", "timesteps"],
                "properties": {
                    "hidden": {"type": "integer", "minimum": 1, "maximum": 8192},
                    "depth": {"type": "integer", "minimum": 1, "maximum": 64},
                    "timesteps": {"type": "integer", "minimum": 1, "maximum": 100_000},
                },
            },
            "sites": {
                "type": "object",
                "propertyNames": PLAIN_NAME,
                "additionalProperties": {"type": "array", "items": FINITE},
            },
            "rms_range": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": FINITE, "minItems": 2, "maxItems": 2},
            },
        },
    },
    "else": {
        "required": ["model", "body", "sites", "norm"],
        "properties": {
            "sites": {"type": "array", "items": PLAIN_NAME},
            "model": {"type": "object"},
            "body": {"type": "object"},
            "norm": {
                "type": "object",
                "required": ["names", "mean", "std"],
                "properties": {
                    "names": {"type": "array", "items": {"type": "string"}},
                    "mean": {"type": "array", "items": FINITE},
                    "std": {"type": "array", "items": FINITE},
                },
            },
        },
    },
}


def _where(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p if str(p).isprintable() else repr(p)}" for p in path]
    return "".join(parts).lstrip(".") or "the top level"


def _short(x: Any, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _validator(schema: dict[str, Any]) -> Any:
    """Draft 2020-12 plus one keyword, `finite`: a number that is not NaN or +-inf."""
    import math

    import jsonschema

    def finite(_v: Any, wanted: bool, instance: Any, _schema: Any) -> Any:
        if wanted and isinstance(instance, float) and not math.isfinite(instance):
            yield jsonschema.ValidationError(f"{instance!r} is not a finite number")

    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"finite": finite})
    return cls(schema)


def validate(obj: Any, schema: dict[str, Any], source: str | Path | None, fix: str) -> Any:
    """`obj` if it matches `schema`; else ONE InputError naming the file (`source`), the key path and `fix`.

    The most specific error is reported (jsonschema's `best_match`), with the offending value cut
    to 60 characters so a crafted megabyte string cannot flood the terminal.
    """
    import jsonschema

    err = jsonschema.exceptions.best_match(_validator(schema).iter_errors(obj))
    if err is None:
        return obj
    key = _where(err.absolute_path)
    if err.validator in ("type", "enum", "const", "pattern", "minimum", "maximum", "not", "anyOf"):
        detail = f"{_short(err.instance)} is not allowed ({err.validator}: {_short(err.validator_value, 80)})"
    else:
        detail = err.message if len(err.message) <= 160 else err.message[:157] + "..."
    raise InputError(f"{key}: {detail}", fix, source)


# hyper.json (weightzoo.hyper.model): the envelope, plus the hypernetwork's config. The architecture is
# checked by check_arch_kwargs, the config's values again by HyperConfig.
HYPER_JSON: dict[str, Any] = {
    "allOf": [{"$ref": "#/$defs/folder"}],
    "$defs": {"folder": FOLDER_JSON},
    "required": ["format", "version", "arch", "hyper", "tasks", "preprocessing"],
    "properties": {
        "version": {"enum": [1]},
        "n_hyper_params": {"type": "integer", "minimum": 0},
        "hyper": {
            "type": "object",
            "additionalProperties": False,
            "required": ["condition", "mip", "hidden", "output"],
            "properties": {
                "condition": {"enum": ["scale", "site"]},
                "mip": {"type": "boolean"},
                "hidden": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": 8192},
                    "minItems": 1,
                    "maxItems": 16,
                },
                "output": {"enum": ["full", "lowrank", "chunked"]},
                "rank": {"type": "integer", "minimum": 1, "maximum": 4096},
                "chunk": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                "scale_range": {
                    "type": "array",
                    "items": _number(minimum=0.2, maximum=0.8),
                    "minItems": 2,
                    "maxItems": 2,
                },
                "sites": {"type": "array", "items": PLAIN_NAME, "maxItems": 4096},
                "site_dropout": _number(minimum=0, maximum=1),
            },
        },
    },
}
