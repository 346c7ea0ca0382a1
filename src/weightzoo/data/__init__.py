"""Data: image I/O, nnU-Net raw datasets, phantoms, importers, 2-D slices."""
