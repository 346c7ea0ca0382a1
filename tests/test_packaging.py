"""A plain `pip install <wheel>` into a venv that already has torch gives a working `weightzoo`, and keeps
that torch (no dependency of ours may pull torchvision or another torch: see README "Dependencies").

The new venv gets the running torch without re-downloading or copying it: a `.pth` file in its
site-packages points at a folder of symlinks to torch's own files (torch, torchgen, functorch and its
dist-info), so the venv "already has torch" exactly as a user's venv would. pip installs everything
else from the package registry (torch's small pure-Python dependencies included). Torch is pinned to
the running version with a constraint file, so that a dependency asking for another torch fails the
resolution (and this test) instead of pip uninstalling torch through those symlinks.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from weightzoo.data.slices import Preprocessing
from weightzoo.nets.unet import ArchSpec, build_network
from weightzoo.segmenter import save_model

REPO = Path(__file__).resolve().parents[1]
PIP_TIMEOUT_S = 600


def _run(cmd: list[str | Path], env: dict[str, str], timeout: float = PIP_TIMEOUT_S) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _clean_env() -> dict[str, str]:
    """The environment without anything that would let the new venv see this one's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _source_copy(dest: Path) -> Path:
    """What `pip install .` builds from (pyproject, README, src/), copied so that building writes no
    build/ or egg-info into the shared working tree."""
    dest.mkdir()
    shutil.copy2(REPO / "pyproject.toml", dest)
    shutil.copy2(REPO / "README.md", dest)
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def _give_running_torch(venv_dir: Path, venv_python: Path, shim: Path) -> str:
    """Make the venv 'already have torch': symlinks to the running torch's top-level files, and a .pth."""
    dist = importlib.metadata.distribution("torch")
    top = sorted({Path(str(f)).parts[0] for f in dist.files or []} - {".."})
    if not any(t.endswith(".dist-info") for t in top):
        pytest.skip("the running torch has no dist-info to hand to a new venv (not a pip-installed torch)")
    site = Path(dist.locate_file(""))
    shim.mkdir()
    for name in top:
        (shim / name).symlink_to(site / name)
    purelib = _run(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], _clean_env()
    )
    Path(purelib.strip(), "running_torch.pth").write_text(f"{shim}\n")
    return dist.version


def _tiny_model_and_png(tmp_path: Path) -> tuple[Path, Path]:
    """An untrained tiny RGB U-Net model folder (made with this venv) and a 40x48 RGB PNG."""
    spec = ArchSpec.preset("tiny", input_channels=3, num_classes=1)
    prep = Preprocessing(normalization="rgb", size=(32, 32), channels=3)
    model = save_model(tmp_path / "model", build_network(spec, seed=0), spec, ["cell"], prep, 0.0)
    rgb = np.random.default_rng(0).integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    png = tmp_path / "cell.png"
    PILImage.fromarray(rgb).save(png)
    return model, png


@pytest.mark.slow
def test_plain_pip_install_of_the_wheel_keeps_torch_and_segments(tmp_path: Path) -> None:
    if importlib.util.find_spec("ensurepip") is None:
        pytest.skip("ensurepip is missing (e.g. Debian without python3-venv): cannot make a venv with pip")
    env = _clean_env()

    # 1. the wheel, as `pip wheel .` builds it (weightzoo alone; its dependencies come in step 3)
    dist_dir = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            dist_dir,
            _source_copy(tmp_path / "src"),
        ],
        env,
    )
    (wheel,) = dist_dir.glob("weightzoo-*.whl")

    # 2. a fresh venv that already has the running torch
    venv_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
    bindir = venv_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    torch_version = _give_running_torch(venv_dir, py, tmp_path / "running_torch")
    constraints = tmp_path / "keep_torch.txt"
    constraints.write_text(f"torch=={torch_version}\n")

    # 3. plain `pip install <wheel>`: dependencies from the registry, nothing may replace torch
    _run([py, "-m", "pip", "install", "-q", "-c", constraints, wheel], env)
    versions = _run(
        [
            py,
            "-c",
            "import importlib.metadata as m, torch, weightzoo, dynamic_network_architectures;"
            "print(torch.__version__, m.version('dynamic-network-architectures'), weightzoo.__file__)",
        ],
        env,
    ).split()
    assert versions[0] == torch_version, versions
    assert str(venv_dir) in versions[2], f"weightzoo imported from {versions[2]}, not the new venv"
    listed = _run([py, "-m", "pip", "list", "--format=freeze"], env).lower().splitlines()
    assert f"torch=={torch_version}" in listed
    assert not [p for p in listed if p.startswith(("torchvision==", "timm==", "nvidia-"))], listed

    # 4. the console script: --help and a tiny segmentation
    assert "segment" in _run([bindir / "weightzoo", "--help"], env, timeout=120)
    model, png = _tiny_model_and_png(tmp_path)
    out = tmp_path / "mask.png"
    _run(
        [bindir / "weightzoo", "segment", "-i", png, "-m", model, "-o", out, "--device", "cpu"],
        env,
        timeout=300,
    )
    mask = np.asarray(PILImage.open(out))
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 1}
