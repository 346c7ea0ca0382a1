"""Uncertainty a reader can trust (docs/uncertainty.md).

    from weightzoo.uncertainty.sources import MCDropout
    from weightzoo.uncertainty.maps import uncertainty_maps
    maps = uncertainty_maps(MCDropout(load_model("model/"), 20, seed=0).samples(images))

sources   where T probability samples come from: MC dropout, TTA, ensembles (zoo:K), in-context
maps      mean, var, entropy, mutual information
metrics   calibration (ECE/ACE/MCE via MONAI, boundary band), Brier, NLL, AUROC, UEO, GED, best Dice
evaluate  per-case metrics for `evaluate --uncertainty`; report: reliability diagrams and map figures
"""
