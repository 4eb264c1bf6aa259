"""Signed maps to displayable images (numpy only: shared by computation and plotting modules)."""
from __future__ import annotations

import numpy as np

__all__ = ["signed_display"]


def signed_display(p, *, percentile: float = 100.0, eps: float = 0.0) -> np.ndarray:
    """Signed (H, W[, C]) array -> float64 image in [0, 1]: ``0.5 + 0.5 * p / s``, clipped.

    ``s`` is the ``percentile`` of ``|p|`` (100: the max), at least ``eps``; zero maps to mid-grey and
    an all-zero input is plain grey, never NaN. A single channel comes back as (H, W).
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    p = np.asarray(p, dtype=np.float64)
    s = max(float(np.nanpercentile(np.abs(p), percentile)) if p.size else 0.0, eps)
    out = np.clip(0.5 + 0.5 * p / s, 0.0, 1.0) if s > 0 else np.full_like(p, 0.5)
    return out[:, :, 0] if out.ndim == 3 and out.shape[2] == 1 else out
