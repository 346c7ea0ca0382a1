"""Manual check: a weightzoo 3-D model exported with `zoo export`, predicted by nnU-Net's own predictor vs
`weightzoo segment` on the same volumes: differing voxels, without and with mirroring TTA.

Needs nnunetv2 importable (not a weightzoo dependency; install it into a scratch target as
docs/nnunet_interop.md shows and put that target on PYTHONPATH):

    weightzoo zoo export runs/cord3d /tmp/export
    PYTHONPATH=/tmp/nnu/target python benchmarks/nnunet_export_check.py runs/cord3d /tmp/export a.nii.gz b.nii.gz

nnU-Net reads each volume with its SimpleITKIO and predicts (`predict_single_npy_array`, tile step 0.5,
Gaussian, CPU); weightzoo writes its mask with `weightzoo segment`, which is read back with SimpleITKIO,
so both are compared in nnU-Net's array order.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def main() -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model, export, images = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    (folder,) = sorted(export.glob("*/*__3d_fullres"))
    for mirror in (False, True):
        pr = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                             perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                             verbose_preprocessing=False, allow_tqdm=False)  # fmt: skip
        pr.initialize_from_trained_model_folder(
            str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth"
        )
        total_diff = total = 0
        for f in images:
            data, props = SimpleITKIO().read_images([f])
            theirs = pr.predict_single_npy_array(data, props, None, None, False)  # [z, y, x] label map
            out = export / f"weightzoo_{Path(f).name.split('.')[0]}_{mirror}.nii.gz"
            cmd = ["weightzoo", "segment", "-i", f, "-m", str(model), "-o", str(out), "--device", "cpu"]
            subprocess.run(cmd + (["--mirror"] if mirror else []), check=True, capture_output=True)
            ours, _ = SimpleITKIO().read_seg(str(out))
            diff = int(((theirs > 0) != (ours[0] > 0)).sum())
            total_diff, total = total_diff + diff, total + theirs.size
            print(f"{Path(f).name} mirror={mirror}: nnU-Net foreground {(theirs > 0).sum()}, weightzoo "
                  f"{(ours[0] > 0).sum()}, differing voxels {diff} of {theirs.size}")  # fmt: skip
        print(f"mirror={mirror}: {total_diff} differing voxels of {total}")


if __name__ == "__main__":
    main()
