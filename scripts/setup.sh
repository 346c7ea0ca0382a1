#!/usr/bin/env bash
# Installs weightzoo into the active Python environment (make and activate a venv first).
# Why two steps:
#  1. torch==2.13.0 first, only if no torch is present: on our machines it is a local CPU build; a bare
#     `torch` requirement could pull a multi-GB CUDA build. (On a GPU machine, install the torch you
#     want first; any >= 2.1 works.) pip keeps an installed torch: no weightzoo dependency pins another.
#  2. the package itself with its test tools. Its dependencies include dynamic-network-architectures
#     (nnU-Net's network classes) pinned to 0.3.x, which needs only torch and numpy (0.4.x declares
#     timm -> torchvision -> another torch); see README "Dependencies".
set -euo pipefail
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -c "import weightzoo, dynamic_network_architectures; print('weightzoo', weightzoo.__version__, 'installed')"
