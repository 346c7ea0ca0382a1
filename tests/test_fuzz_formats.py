"""Property-based fuzzing of every JSON file format we read (hypothesis).

Each test takes a VALID file (dataset.json, the split file, model.json, generator.json), replaces or
deletes one value anywhere in it with arbitrary JSON (NaN, huge numbers, path-like strings, nested
junk), and runs the command a user would. The property: exit code 0 or 2, never a traceback; on
exit 2, one line that starts with `error:` and names the file, and no output written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightzoo.cli import main
from weightzoo.data.raw import SPLITS_FILE, RawDataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEFAULT_EXAMPLES = 25  # per format, in every run of the suite; docs/safety.md states the total
EXAMPLES = int(os.environ.get("WEIGHTZOO_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))  # deeper runs: set it higher
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure is reproducible, CI is stable
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "..", "../../x", "/etc/passwd", "a/b", "~", "x" * 300, "cord", "0", "-1"])
    | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple = (), depth: int = 4) -> list[tuple]:
    """Every key path into obj (dict keys, list indices), up to `depth` levels, capped per list."""
    out = [prefix] if prefix else []
    if depth == 0:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k), depth - 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            out += _paths(v, (*prefix, i), depth - 1)
    return out


def _mutate(obj: Any, path: tuple, value: Any, delete: bool) -> Any:
    obj = json.loads(json.dumps(obj))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def _check(rc: int, err: str, filename: str, outputs: list[Path]) -> None:
    assert rc in (0, 2), (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), err
        assert filename in lines[0], err
        assert not any(p.exists() for p in outputs), err


def _fuzz_file(
    data: st.DataObject, original: Any, path: Path, run: Any, outputs: list[Path], capsys: Any
) -> None:
    paths = _paths(original)
    where = data.draw(st.sampled_from(paths), label="where")
    value, delete = data.draw(junk, label="value"), data.draw(st.booleans(), label="delete")
    text = json.dumps(_mutate(original, where, value, delete), allow_nan=True)
    path.write_text(text)
    for p in outputs:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        rc = run()
    finally:
        path.write_text(json.dumps(original))
    _check(rc, capsys.readouterr().err, path.name, outputs)


@pytest.fixture(scope="module")
def fuzz_dataset(tiny_phantom_dataset: RawDataset, tmp_path_factory: pytest.TempPathFactory) -> RawDataset:
    root = tmp_path_factory.mktemp("fuzzds") / tiny_phantom_dataset.root.name
    shutil.copytree(tiny_phantom_dataset.root, root)
    RawDataset.open(root).splits()  # make sure the split file exists
    return RawDataset.open(root)


@FUZZ
@given(data=st.data())
def test_fuzz_dataset_json(data: st.DataObject, fuzz_dataset: RawDataset, capsys: Any) -> None:
    path = fuzz_dataset.root / "dataset.json"
    original = json.loads(path.read_text())
    _fuzz_file(data, original, path, lambda: main(["data", "info", str(fuzz_dataset.root)]), [], capsys)


@FUZZ
@given(data=st.data())
def test_fuzz_split_file(data: st.DataObject, fuzz_dataset: RawDataset, capsys: Any) -> None:
    path = fuzz_dataset.root / SPLITS_FILE
    original = json.loads(path.read_text())
    _fuzz_file(data, original, path, lambda: main(["data", "info", str(fuzz_dataset.root)]), [], capsys)


@pytest.fixture(scope="module")
def fuzz_model(phantom_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzzmodel") / "model"
    shutil.copytree(phantom_base, out)
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_model_json(
    data: st.DataObject, fuzz_model: Path, tiny_phantom_dataset: RawDataset, tmp_path: Path, capsys: Any
) -> None:
    path = fuzz_model / "model.json"
    original = json.loads(path.read_text())
    image = tiny_phantom_dataset.image_files(tiny_phantom_dataset.cases()[0])[0]
    out = tmp_path / "mask.nii.gz"
    argv = ["segment", "-m", str(fuzz_model), "-i", str(image), "-o", str(out), "--device", "cpu"]
    _fuzz_file(data, original, path, lambda: main(argv), [out], capsys)


@pytest.mark.parametrize("value", ["", None, "12", -1.0, [3.0], float("nan")])
def test_model_json_seconds_to_build_of_the_wrong_kind(
    value: Any, fuzz_model: Path, tiny_phantom_dataset: RawDataset, tmp_path: Path, capsys: Any
) -> None:
    """Regressions CI's fuzzing found (hypothesis 6.170): a non-number `seconds_to_build` crashed segment."""
    path = fuzz_model / "model.json"
    original = json.loads(path.read_text())
    image = tiny_phantom_dataset.image_files(tiny_phantom_dataset.cases()[0])[0]
    out = tmp_path / "mask.nii.gz"
    path.write_text(json.dumps(_mutate(original, ("seconds_to_build",), value, False), allow_nan=True))
    try:
        rc = main(["segment", "-m", str(fuzz_model), "-i", str(image), "-o", str(out), "--device", "cpu"])
    finally:
        path.write_text(json.dumps(original))
    _check(rc, capsys.readouterr().err, path.name, [out])
    assert rc == 2


@pytest.fixture(scope="module")
def fuzz_generator(finetune_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from weightzoo.generate.delta import DeltaGenConfig, train_delta_generator

    out = tmp_path_factory.mktemp("fuzzgen") / "gen"
    train_delta_generator(finetune_zoo, out, DeltaGenConfig(steps=20, hidden=32, depth=1), log=lambda m: None)
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_generator_json(data: st.DataObject, fuzz_generator: Path, tmp_path: Path, capsys: Any) -> None:
    path = fuzz_generator / "generator.json"
    original = json.loads(path.read_text())
    out = tmp_path / "net"
    argv = [
        "generate",
        "sample",
        "-g",
        str(fuzz_generator),
        "--task",
        "cord",
        "--site",
        "A",
        "--out",
        str(out),
    ]
    _fuzz_file(data, original, path, lambda: main(argv), [out], capsys)


@pytest.fixture(scope="module")
def fuzz_hyper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from weightzoo.data.slices import Preprocessing
    from weightzoo.hyper.model import HyperConfig, HyperUNet, save_hyper
    from weightzoo.nets.unet import ArchSpec

    model = HyperUNet(ArchSpec.preset("tiny"), HyperConfig(condition="site", sites=["A", "B"]), seed=0)
    out = tmp_path_factory.mktemp("fuzzhyper") / "hyper"
    return save_hyper(
        out, model, ["cord"], Preprocessing("zscore", (64, 64), 2, 1), 1.0, {"sites": ["A", "B"]}
    )


@FUZZ
@given(data=st.data())
def test_fuzz_hyper_json(
    data: st.DataObject, fuzz_hyper: Path, tiny_phantom_dataset: RawDataset, tmp_path: Path, capsys: Any
) -> None:
    path = fuzz_hyper / "hyper.json"
    original = json.loads(path.read_text())
    image = tiny_phantom_dataset.image_files(tiny_phantom_dataset.cases()[0])[0]
    out = tmp_path / "mask.nii.gz"
    argv = [
        "segment",
        "-m",
        str(fuzz_hyper),
        "--site",
        "A",
        "-i",
        str(image),
        "-o",
        str(out),
        "--device",
        "cpu",
    ]
    _fuzz_file(data, original, path, lambda: main(argv), [out], capsys)


def test_fuzz_cases_are_counted_in_the_docs() -> None:
    """docs/safety.md states how many fuzzed files the suite runs; keep it true."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "safety.md").read_text()
    assert f"{7 * DEFAULT_EXAMPLES} fuzzed files" in text


def _api_outcome(run: Any, filename: str) -> None:
    """Python-API form of the property: success, or one WeightzooError line naming the file."""
    from weightzoo.errors import WeightzooError

    try:
        run()
    except WeightzooError as e:
        text = str(e)
        assert "\n" not in text and filename in text, text


@FUZZ
@given(data=st.data())
def test_fuzz_zoo_grid(data: st.DataObject, tiny_phantom_dataset: RawDataset, tmp_path: Path) -> None:
    """A zoo grid (YAML) with one value replaced or deleted: planned, or refused naming the grid."""
    import yaml

    from weightzoo.zoo.grid import Grid

    original = {"tasks": ["cord", ["cord", "gm"]], "sites": "each", "seeds": 2, "preset": "tiny",
                "lr": [1e-3, 1e-2], "steps": 20, "batch_size": 4, "checkpoints": 2, "size": 32,
                "run_split": {"train": 0.6, "val": 0.2, "test": 0.2}}  # fmt: skip
    where = data.draw(st.sampled_from(_paths(original)), label="where")
    value, delete = data.draw(junk, label="value"), data.draw(st.booleans(), label="delete")
    path = tmp_path / "grid.yaml"
    try:
        path.write_text(yaml.safe_dump(_mutate(original, where, value, delete)))
    except (ValueError, yaml.YAMLError):
        return  # not writable as YAML (e.g. NaN keys): nothing a user could hand us
    _api_outcome(lambda: Grid.from_file(path).expand(tiny_phantom_dataset), path.name)


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An nnU-Net v2 results folder (a tiny 2-task export) whose plans.json the fuzzer edits."""
    from weightzoo.nets.unet import ArchSpec, build_network, real_state_dict
    from weightzoo.zoo.nnunet import nnunet_dataset_json, write_nnunet_results

    spec = ArchSpec.preset("tiny", 1, 2)
    dj = nnunet_dataset_json(["T2"], {"cord": [1, 2], "gm": [2]}, ".nii.gz", name="Phantom")
    root = tmp_path_factory.mktemp("fuzzres") / "Dataset501_Phantom" / "nnUNetTrainer__nnUNetPlans__2d"
    write_nnunet_results(root, spec, real_state_dict(build_network(spec, seed=0)), dj)
    return root


@FUZZ
@given(data=st.data())
def test_fuzz_nnunet_plans(data: st.DataObject, fuzz_results: Path) -> None:
    """nnU-Net's plans.json with one value replaced or deleted: ingested, or refused naming plans.json."""
    from weightzoo.zoo.nnunet import read_nnunet_results

    path = fuzz_results / "plans.json"
    original = json.loads(path.read_text())
    where = data.draw(st.sampled_from(_paths(original)), label="where")
    value, delete = data.draw(junk, label="value"), data.draw(st.booleans(), label="delete")
    path.write_text(json.dumps(_mutate(original, where, value, delete), allow_nan=True))
    try:
        _api_outcome(lambda: read_nnunet_results(fuzz_results), "plans.json")
    finally:
        path.write_text(json.dumps(original))
