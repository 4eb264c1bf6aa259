"""Layer-1 health (Zeiler & Fergus 2014, Fig. 6): dead and dominant first-layer filters, frequency content.

Per filter ``w[o]`` (shape ``(C_in, kh, kw)``):

* ``rms[o] = sqrt(mean(w[o]**2))``.
* dead: ``rms <= dead_ratio * median(rms)`` (default ``dead_ratio = 1e-3``: a filter a thousand
  times weaker than the typical one contributes nothing but its bias; all-zero filters always
  qualify). On the bundled EfficientNet-Lite0 this flags exactly the 4 all-zero stem filters
  (RMS <= 4.3e-8 against a median of 0.55).
* dominant: ``rms >= dominant_ratio * median(rms)`` (default 3.0) -- the paper's symptom of a
  too-large learning rate, "a few filters dominate".
* frequency content: each input-channel slice is zero-padded to ``n_fft`` x ``n_fft`` (default 64),
  its 2-D power spectrum ``|FFT|**2`` is summed over input channels, and the energy is split by
  radial frequency ``rho = sqrt(fy**2 + fx**2) / 0.5`` (1 = Nyquist along one axis; corners reach
  sqrt(2)) into ``low: rho < 1/3``, ``mid: 1/3 <= rho < 2/3``, ``high: rho >= 2/3``; shares sum
  to 1 (NaN for an all-zero filter). A finite filter has spectral side lobes: a constant 3x3
  filter puts 55% / 34% / 11% of its energy in low / mid / high (its main lobe reaches rho = 2/3),
  a constant 11x11 91% in low; a 3x3 +/- checkerboard puts 98% in high. Compare filters of
  the same size with each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .layers import unwrap_model
from ._results import load_dataclass, save_dataclass

__all__ = ["Layer1Health", "layer1_health", "first_conv", "band_energy", "run_layer1"]

BANDS = ("low", "mid", "high")
BAND_EDGES = (1 / 3, 2 / 3)  # in units of the Nyquist frequency


@dataclass(frozen=True)
class Layer1Health:
    """Diagnostics of a first conv layer with ``F`` filters."""

    weight: np.ndarray  # (F, C_in, kh, kw) float32, the filters
    rms: np.ndarray  # (F,) float32
    dead: np.ndarray  # (F,) bool
    dominant: np.ndarray  # (F,) bool
    bands: np.ndarray  # (F, 3) float32 share of energy in low / mid / high frequencies (rows sum to 1)
    median_rms: float
    dead_ratio: float
    dominant_ratio: float
    layer: str = ""

    @property
    def dead_filters(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.dead)]

    @property
    def dominant_filters(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.dominant)]

    def summary(self) -> dict:
        live = ~self.dead
        return {"layer": self.layer, "filters": int(len(self.rms)), "dead": self.dead_filters,
                "dominant": self.dominant_filters, "median_rms": self.median_rms,
                "mean_band_share_live": dict(zip(BANDS, np.nanmean(self.bands[live], 0).round(4).tolist()))
                if live.any() else None}

    def save(self, path) -> Path:
        return save_dataclass(self, path)

    @classmethod
    def load(cls, path) -> "Layer1Health":
        return load_dataclass(cls, path)


def first_conv(model) -> tuple[str, nn.Module]:
    """The first ``nn.Conv2d`` (or subclass) in module registration order: ``(name, module)``."""
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError(f"{type(unwrap_model(model)).__name__} has no nn.Conv2d; pass the first-layer weight "
                     "tensor (F, C_in, kh, kw) instead")


def band_energy(weight: np.ndarray, *, n_fft: int = 64) -> np.ndarray:
    """(F, C, kh, kw) filters -> (F, 3) shares of spectral energy in the low / mid / high bands."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"weight must be (F, C_in, kh, kw), got shape {w.shape}")
    kh, kw = w.shape[2:]
    if n_fft < max(kh, kw):
        raise ValueError(f"n_fft={n_fft} is smaller than the {kh}x{kw} kernel")
    power = (np.abs(np.fft.fft2(w, s=(n_fft, n_fft))) ** 2).sum(1)  # (F, n, n)
    f = np.fft.fftfreq(n_fft)
    rho = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2) / 0.5
    idx = np.digitize(rho, BAND_EDGES)  # 0 low, 1 mid, 2 high
    energy = np.stack([power[:, idx == b].sum(1) for b in range(3)], 1)
    total = energy.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, energy / np.where(total > 0, total, 1), np.nan)


def layer1_health(model_or_weight, *, dead_ratio: float = 1e-3, dominant_ratio: float = 3.0,
                  n_fft: int = 64) -> Layer1Health:
    """RMS, dead/dominant flags and frequency content of the first conv layer (module docstring).

    ``model_or_weight``: a model / LoadedModel (its first ``nn.Conv2d`` is used) or a weight
    tensor/array of shape (F, C_in, kh, kw).
    """
    layer = ""
    if isinstance(model_or_weight, (torch.Tensor, np.ndarray)):
        w = model_or_weight.detach().cpu().numpy() if isinstance(model_or_weight, torch.Tensor) \
            else np.asarray(model_or_weight)
    else:
        layer, conv = first_conv(model_or_weight)
        w = conv.weight.detach().cpu().numpy()
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 4 or w.shape[0] < 1:
        raise ValueError(f"first-layer weight must be (F, C_in, kh, kw), got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("first-layer weight contains NaN or infinite values")
    if not (0 <= dead_ratio < 1 < dominant_ratio):
        raise ValueError(f"need 0 <= dead_ratio < 1 < dominant_ratio, got {dead_ratio}, {dominant_ratio}")
    rms = np.sqrt((w.astype(np.float64) ** 2).mean((1, 2, 3)))
    med = float(np.median(rms))
    dead = rms <= dead_ratio * med
    dominant = (rms >= dominant_ratio * med) & (med > 0)
    return Layer1Health(weight=w, rms=rms.astype(np.float32), dead=dead, dominant=dominant,
                        bands=band_energy(w, n_fft=n_fft).astype(np.float32), median_rms=med,
                        dead_ratio=float(dead_ratio), dominant_ratio=float(dominant_ratio), layer=layer)


def run_layer1(loaded, out_dir, **kwargs) -> Layer1Health:
    """Layer-1 health of ``loaded``; writes ``layer1_health.png`` and ``layer1_health.npz/.json``."""
    import json

    from .plot_experiments import plot_layer1_health

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = layer1_health(loaded, **kwargs)
    h.save(out / "layer1_health")
    (out / "layer1_health_summary.json").write_text(json.dumps(h.summary(), indent=1))
    fig = plot_layer1_health(h, title=f"{getattr(loaded, 'name', type(unwrap_model(loaded)).__name__)}")
    fig.savefig(out / "layer1_health.png", dpi=110)
    return h
