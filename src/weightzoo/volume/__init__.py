"""Run nnU-Net v2 models (3-D and 2-D configurations) on a volume exactly as nnU-Net's predictor does.

`preprocess` reproduces nnU-Net's DefaultPreprocessor (also used to build our own 3-D training volumes),
`sliding_window` its Gaussian-weighted sliding-window prediction with mirroring TTA, and `predictor`
the export back onto the input's grid and a Segmenter-like class for zoo checkpoints. Checked to be
bit-identical to nnunetv2 2.8.1 (see docs/nnunet_interop.md, "3-D and running nnU-Net models").
"""
