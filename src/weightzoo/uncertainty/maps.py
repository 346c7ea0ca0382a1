"""Uncertainty maps from T probability samples of binary (sigmoid) outputs.

samples: [T, ..., *spatial] foreground probabilities p_t (one sample per MC-dropout pass, ensemble
member, TTA transform or in-context candidate). With p̄ = mean_t p_t and H(p) = −p log2 p − (1−p) log2(1−p):

  mean      p̄                              the prediction (thresholded at 0.5 for the mask)
  var       var_t p_t                      spread of the samples, in [0, 0.25]
  entropy   H(p̄)  (bits, in [0, 1])         total predictive uncertainty: high where p̄ ≈ 0.5
  mi        H(p̄) − mean_t H(p_t)  (bits)    mutual information: the part due to disagreement between
                                           samples (epistemic); 0 when every sample says the same
Entropy is aleatoric + epistemic; MI isolates the epistemic part (what more data or a better model
could remove). A single deterministic network has var = mi = 0 and entropy from its own softness.
"""

from __future__ import annotations

import torch

MAPS = ("mean", "var", "entropy", "mi")
EPS = 1e-7


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in bits, elementwise; 0 at p = 0 or 1."""
    p = p.clamp(EPS, 1 - EPS)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def uncertainty_maps(samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """{mean, var, entropy, mi} over the first dimension of samples [T, ...] (each [...])."""
    samples = samples.float()
    mean = samples.mean(0)
    entropy = binary_entropy(mean)
    mi = (entropy - binary_entropy(samples).mean(0)).clamp_min(0)
    var = samples.var(0, unbiased=False)
    return {"mean": mean, "var": var, "entropy": entropy, "mi": mi}
