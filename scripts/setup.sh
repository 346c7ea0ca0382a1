#!/usr/bin/env bash
# Installs weightzoo into the active Python environment (make and activate a venv first).
# Why three steps:
#  1. torch==2.13.0 first: on our machines it is a local CPU build; a bare `torch` requirement could
#     pull a multi-GB CUDA build. (On a GPU machine, install the torch you want first; any >= 2.1 works.)
#  2. dynamic-network-architectures (nnU-Net's network classes) with --no-deps: it declares timm, which
#     pulls torchvision and, with it, another torch; the U-Net module we use imports neither.
#  3. the package itself with its test tools.
set -euo pipefail
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "dynamic-network-architectures==0.4.4"
python -m pip install -q -e ".[dev]"
python -c "import weightzoo, dynamic_network_architectures; print('weightzoo', weightzoo.__version__, 'installed')"
