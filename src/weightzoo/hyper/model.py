"""A U-Net whose weights come from a hypernetwork, conditioned on a scale φ or on a site; its folder.

Conditions (HyperConfig.condition):
  scale  φ ∈ [lo, hi] (default [0.25, 0.75]), one per batch: the network is the scale-space U-Net
         (weightzoo.nets.functional_unet, mode "scale"), every level resized by φ. The hypernetwork
         sees z = (φ - lo) / (hi - lo) ∈ [0, 1].
  site   a site index per sample (0 = unknown site, 1.. = HyperConfig.sites), as a one-hot code: the
         network is nnU-Net's PlainConvUNet (mode "plain"), so a sampled site is a plain model folder
         that nnU-Net can also run. Samples of one batch may have different sites (grouped convs).

Hyper folder (written by `weightzoo hyper train`, read by `hyper sample|front`, `segment`, `evaluate`):
  hyper.json          {"format": "weightzoo-hyper", "version": 1, "arch": ArchSpec (the plain preset),
                       "hyper": HyperConfig, "tasks", "preprocessing", "n_params", "n_hyper_params",
                       "seconds_to_build", "info": {...}}
  hyper.safetensors   the HyperUNet's state_dict
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from weightzoo.data.slices import Preprocessing
from weightzoo.errors import InputError, ModelError, WeightzooError
from weightzoo.fileio import atomic_write_json, read_folder_description
from weightzoo.hyper.hypernet import OUTPUTS, CosSinEncoding, HyperNet, RawEncoding
from weightzoo.nets.functional_unet import check_functional, he_init, param_shapes, unet_forward
from weightzoo.nets.unet import (
    SCALE_SPACE_UNET,
    ArchSpec,
    build_network,
    load_real_state_dict,
    real_state_dict,
)
from weightzoo.segmenter import NetSegmenter, resolve_device, save_model

HYPER_JSON, HYPER_WEIGHTS, HYPER_FORMAT = "hyper.json", "hyper.safetensors", "weightzoo-hyper"
CONDITIONS = ("scale", "site")
UNKNOWN_SITE = 0


@dataclass
class HyperConfig:
    """How the hypernetwork is built and conditioned. `from_dict` rejects unknown keys."""

    condition: str = "scale"  # scale | site
    mip: bool = True  # MIP parametrization (cos/sin encoding, θ = θ₀ + Δθ); False: the default one
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    output: str = "chunked"  # full | lowrank | chunked
    rank: int = 16
    chunk: int = 512
    scale_range: tuple[float, float] = (0.25, 0.75)
    sites: list[str] = field(default_factory=list)  # site condition: the known sites, in code order
    site_dropout: float = 0.1  # site condition: share of training samples shown as the unknown site

    def __post_init__(self) -> None:
        def bad(what: str, fix: str) -> InputError:
            return InputError(f"hyper config: {what}", fix)

        if self.condition not in CONDITIONS:
            raise bad(f"unknown condition {self.condition!r}", f"use one of {', '.join(CONDITIONS)}")
        if self.output not in OUTPUTS:
            raise bad(f"unknown output {self.output!r}", f"use one of {', '.join(OUTPUTS)}")
        lo, hi = (float(v) for v in self.scale_range)
        if not 0.2 <= lo < hi <= 0.8:
            raise bad(f"scale range {self.scale_range} must lie in [0.2, 0.8] with lo < hi", "e.g. 0.25,0.75")
        self.scale_range = (lo, hi)
        self.hidden = [int(h) for h in self.hidden]
        if not self.hidden or min(self.hidden) < 1 or self.rank < 1 or self.chunk < 1:
            raise bad("hidden sizes, rank and chunk must be positive", "e.g. hidden [64, 64]")
        if not 0 <= self.site_dropout < 1:
            raise bad(f"site_dropout {self.site_dropout} must be in [0, 1)", "e.g. 0.1")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "scale_range": list(self.scale_range)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> HyperConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"unknown hyper config key(s) {unknown}", "remove them", source)
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise InputError(
                f"invalid hyper config ({e})", "re-create the folder with weightzoo", source
            ) from None


def scale_space_spec(spec: ArchSpec, phi: float) -> ArchSpec:
    """A PlainConvUNet preset `spec` as a scale-space U-Net resizing by `phi` (same features and convs)."""
    check_functional(spec.arch_kwargs)
    return ArchSpec(
        {**spec.arch_kwargs, "scale": float(phi)}, spec.input_channels, spec.num_classes, SCALE_SPACE_UNET
    )


class HyperUNet(nn.Module):
    """forward(x [B, C, H, W], cond) -> logits [B, K, H, W].

    cond: φ (a float) for the scale condition; site indices (an int or a LongTensor [B]) for the site
    condition. Parameters: the hypernetwork (with θ₀ under MIP), and for the site condition the
    PlainConvUNet tensors the forward never uses (its deep-supervision seg layers), kept as buffers so
    a sampled network is a complete PlainConvUNet.
    """

    def __init__(self, spec: ArchSpec, hcfg: HyperConfig, seed: int = 0):
        super().__init__()
        check_functional(spec.arch_kwargs)
        if hcfg.condition == "site" and not hcfg.sites:
            raise InputError(
                "a site hypernetwork needs the list of sites", "train on a dataset with a sites map"
            )
        self.spec, self.hcfg = spec, hcfg
        self.mode = "scale" if hcfg.condition == "scale" else "plain"
        self.kw = spec.arch_kwargs
        shapes = param_shapes(self.kw, spec.input_channels, spec.num_classes, self.mode)
        if self.mode == "plain":  # θ₀ = the primary network's own initialisation
            full = real_state_dict(build_network(spec, seed=seed))
            theta0 = {k: full[k] for k in shapes}
            for k, v in full.items():
                if k not in shapes:
                    self.register_buffer("unused__" + k.replace(".", "__"), v.detach().clone())
        else:
            theta0 = he_init(shapes, seed)
        dims = 1 if hcfg.condition == "scale" else len(hcfg.sites) + 1
        encoding = CosSinEncoding(dims) if hcfg.mip and hcfg.condition == "scale" else RawEncoding(dims)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.hyper = HyperNet(
                shapes, encoding, theta0, hcfg.hidden, hcfg.output, hcfg.mip, hcfg.rank, hcfg.chunk
            )

    # ---- conditions ------------------------------------------------------------------------------------
    def scale_code(self, phi: float) -> torch.Tensor:
        lo, hi = self.hcfg.scale_range
        return torch.tensor([[(float(phi) - lo) / (hi - lo)]])  # [1, 1]

    def site_index(self, site: str | None, source: str | Path | None = None) -> int:
        """0 for None; a clear error for a site the model was not trained on."""
        if site is None:
            return UNKNOWN_SITE
        if site not in self.hcfg.sites:
            raise InputError(
                f"site '{site}' is not one the hypernetwork was trained on",
                f"use one of {', '.join(self.hcfg.sites)}, or leave --site out for the unknown-site weights",
                source,
            )
        return 1 + self.hcfg.sites.index(site)

    def check_scale(self, phi: float, source: str | Path | None = None) -> float:
        lo, hi = self.hcfg.scale_range
        if not lo <= float(phi) <= hi:
            raise InputError(
                f"scale {phi} is outside the trained range [{lo}, {hi}]",
                f"use --scale in [{lo}, {hi}]",
                source,
            )
        return float(phi)

    def weights(self, cond: Any) -> dict[str, torch.Tensor]:
        """Generated weights {name: [*shape]} for ONE condition (φ, or a site index)."""
        dev = self.hyper.head.weight.device
        if self.hcfg.condition == "scale":
            code = self.scale_code(cond).to(dev)
        else:
            code = nn.functional.one_hot(torch.tensor([int(cond)], device=dev), len(self.hcfg.sites) + 1)
        return {k: v[0] for k, v in self.hyper(code).items()}

    def forward(self, x: torch.Tensor, cond: Any) -> torch.Tensor:
        if self.hcfg.condition == "scale":
            return unet_forward(self.weights(cond), x, self.kw, "scale", float(cond))
        ids = torch.as_tensor(cond, device=x.device).long().reshape(-1).expand(len(x))
        uniq, inverse = torch.unique(ids, return_inverse=True)
        n_codes = len(self.hcfg.sites) + 1
        if len(uniq) == 1:
            flat = self.hyper.flat(nn.functional.one_hot(uniq, n_codes))  # [1, P]
            return unet_forward({k: v[0] for k, v in self.hyper.unflatten(flat).items()}, x, self.kw, "plain")
        if 2 * len(uniq) <= len(x):  # few distinct conditions: generate each once, then gather per sample
            flat = self.hyper.flat(nn.functional.one_hot(uniq, n_codes))[inverse]  # [B, P]
        else:  # mostly distinct: generating per sample costs the same and saves the gather
            flat = self.hyper.flat(nn.functional.one_hot(ids, n_codes))
        return unet_forward(self.hyper.unflatten(flat), x, self.kw, "plain", batched=True)

    # ---- sampling a plain network ----------------------------------------------------------------------
    def sample_spec(self, cond: Any) -> ArchSpec:
        if self.hcfg.condition == "site":
            return self.spec
        return scale_space_spec(self.spec, self.check_scale(cond))

    @torch.no_grad()
    def sample_network(self, cond: Any) -> nn.Module:
        """A standalone network (PlainConvUNet or ScaleSpaceUNet) with this condition's weights."""
        spec = self.sample_spec(cond)
        net = build_network(spec)
        gen = {k: v.detach().cpu() for k, v in self.weights(cond).items()}
        if self.hcfg.condition == "scale":
            state = {"params." + k.replace(".", "__"): v for k, v in gen.items()}
        else:
            unused = {
                k.removeprefix("unused__").replace("__", "."): v.cpu()
                for k, v in self.named_buffers()
                if k.startswith("unused__")
            }
            state = {**unused, **gen}
        return load_real_state_dict(net, state).eval()

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---- the folder --------------------------------------------------------------------------------------
def save_hyper(
    folder: str | Path,
    model: HyperUNet,
    tasks: list[str],
    preprocessing: Preprocessing,
    seconds_to_build: float,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a hyper folder (weights first, then hyper.json, both atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{HYPER_WEIGHTS}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(folder / HYPER_WEIGHTS)
    atomic_write_json(
        folder / HYPER_JSON,
        {
            "format": HYPER_FORMAT,
            "version": 1,
            "arch": model.spec.to_dict(),
            "hyper": model.hcfg.to_dict(),
            "tasks": list(tasks),
            "preprocessing": preprocessing.to_dict(),
            "n_params": model.n_params(),
            "n_hyper_params": model.hyper.n_hyper_params(),
            "seconds_to_build": float(seconds_to_build),
            "info": info or {},
        },
    )
    return folder


def is_hyper_folder(folder: str | Path) -> bool:
    return (Path(folder) / HYPER_JSON).is_file()


def read_hyper_json(folder: str | Path) -> dict[str, Any]:
    from weightzoo import schemas

    return read_folder_description(
        folder, HYPER_JSON, HYPER_FORMAT, "weightzoo hyper train", "hyper", schema=schemas.HYPER_JSON
    )


def load_hyper(folder: str | Path) -> tuple[HyperUNet, dict[str, Any]]:
    """(model on CPU, hyper.json) with one-line errors for a missing, corrupt or mismatched file."""
    folder = Path(folder)
    meta = read_hyper_json(folder)
    spec = ArchSpec.from_dict(meta["arch"], folder / HYPER_JSON)
    hcfg = HyperConfig.from_dict(meta["hyper"], folder / HYPER_JSON)
    try:
        model = HyperUNet(spec, hcfg)
    except WeightzooError as e:  # a valid PlainConvUNet block the hypernetwork U-Net cannot run
        raise ModelError(
            e.what, e.fix or "re-create the folder with weightzoo hyper train", folder / HYPER_JSON
        ) from None
    wpath = folder / HYPER_WEIGHTS
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, FileNotFoundError) as e:
        raise ModelError(
            f"cannot read the hypernetwork weights ({e})", "re-run weightzoo hyper train", wpath
        ) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ModelError(
            f"weights do not fit {HYPER_JSON} (missing {missing[:2]}, unexpected {unexpected[:2]}, shape {wrong[:2]})",
            "use the folder's own files; re-run weightzoo hyper train",
            wpath,
        )
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise ModelError("the hypernetwork weights contain NaN or inf", "re-run weightzoo hyper train", wpath)
    return model.eval(), meta


def condition_of(model: HyperUNet, scale: float | None, site: str | None, source: str | Path) -> Any:
    """The condition a CLI call asks for, checked against the model's kind."""
    if model.hcfg.condition == "scale":
        if site is not None:
            raise InputError("a scale hypernetwork takes --scale, not --site", "drop --site", source)
        if scale is None:
            raise InputError(
                "a scale hypernetwork needs --scale",
                "e.g. --scale 0.5 (trained on [{}, {}])".format(*model.hcfg.scale_range),
                source,
            )
        return model.check_scale(scale, source)
    if scale is not None:
        raise InputError("a site hypernetwork takes --site, not --scale", "drop --scale", source)
    return model.site_index(site, source)


def hyper_segmenter(
    folder: str | Path, scale: float | None = None, site: str | None = None, device: str = "auto"
) -> NetSegmenter:
    """A Segmenter for one condition of a hyper folder (the sampled network, run as any model)."""
    t0 = time.perf_counter()
    model, meta = load_hyper(folder)
    cond = condition_of(model, scale, site, Path(folder) / HYPER_JSON)
    net = model.sample_network(cond)
    prep = Preprocessing.from_dict(meta["preprocessing"], Path(folder) / HYPER_JSON)
    name = f"{Path(folder).name}@{'scale=' + str(cond) if model.hcfg.condition == 'scale' else site or 'unknown-site'}"
    return NetSegmenter(
        net,
        model.sample_spec(cond),
        meta["tasks"],
        prep,
        name,
        time.perf_counter() - t0,
        resolve_device(device),
    )


def sample_to_folder(
    folder: str | Path, out: str | Path, scale: float | None = None, site: str | None = None
) -> Path:
    """`weightzoo hyper sample`: one condition's network as a plain model folder."""
    seg = hyper_segmenter(folder, scale, site, device="cpu")
    meta = read_hyper_json(folder)
    cond = {"scale": scale} if seg.spec.network_class_name == SCALE_SPACE_UNET else {"site": site}
    info = {
        "hyper": str(folder),
        "condition": cond,
        "sites": meta["info"].get("sites", []),
        "dataset": meta["info"].get("dataset"),
    }
    return save_model(
        out, seg.net, seg.spec, seg.tasks, seg.preprocessing, seg.seconds_to_build, "hyper", info
    )


def evaluate_hyper_sites(folder: str | Path, ds: Any, device: str = "auto", **kwargs: Any) -> dict[str, Any]:
    """Evaluate a site hypernetwork with each case given its site's weights (sites it was not trained
    on: the unknown-site weights). kwargs as `evaluate_by_site`."""
    from weightzoo.evaluate.summary import evaluate_by_site

    model, meta = load_hyper(folder)
    prep = Preprocessing.from_dict(meta["preprocessing"], Path(folder) / HYPER_JSON)
    dev = resolve_device(device)

    def segmenter_for(site: str) -> tuple[NetSegmenter, str]:
        known = site in model.hcfg.sites
        cond = model.site_index(site if known else None)
        net = model.sample_network(cond)
        used = site if known else "unknown-site"
        return NetSegmenter(
            net, model.spec, meta["tasks"], prep, f"{Path(folder).name}@{used}", 0.0, dev
        ), used

    return evaluate_by_site(
        segmenter_for, ds, model_name=f"{Path(folder).name} (site hypernetwork)", **kwargs
    )
