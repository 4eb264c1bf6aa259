"""Fig.-2 building blocks: which layers and filters to show, and their projection/patch tiles.

Composes :mod:`vizlearn.topk`, :mod:`vizlearn.projection` and :mod:`vizlearn.receptive_field`;
computes only (no files, no matplotlib).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .images import ImageSet, to_tensor
from .layer1 import first_conv
from .layers import list_layers, unwrap_model
from .models import LoadedModel
from .projection import display_projection, project_units
from .receptive_field import Field, crop_patch, receptive_field
from .topk import TopK

__all__ = ["default_layers", "first_conv", "choose_filters", "effective_side", "feature_tiles", "FeatureTiles", "TILE"]

# Known good layer choices: stage outputs spread from shallow to deep.
_PRESETS = {
    # timm EfficientNet: `bn1.drop` / `bn2.drop` are the BatchNorm outputs just before ReLU6; after the
    # ReLU6 most top activations are clipped to exactly 6 and could not be ranked.
    "EfficientNet": ["bn1.drop", "blocks.1", "blocks.2", "blocks.4", "bn2.drop"],
    "ResNet": ["relu", "layer1", "layer2", "layer3", "layer4"],
}
TILE = 64  # largest tile side stored in results.npz and drawn in panels


def default_layers(model, *, n: int = 5, input_size: int = 224, in_channels: int = 3) -> list[str]:
    """~``n`` layers from shallow to deep.

    Known families (timm EfficientNet, torchvision ResNet) use a preset of stage outputs.
    Otherwise: the top-level stages (direct children; the children of a ``features`` block for
    VGG/AlexNet/MobileNet-style models) whose output is a spatial map, evenly spaced.
    """
    module = unwrap_model(model)
    preset = _PRESETS.get(type(module).__name__)
    names = set(dict(module.named_modules()))
    if preset and all(p in names for p in preset):
        return list(preset)
    rows = list_layers(module, input_size=input_size, in_channels=in_channels, receptive_fields=False)
    spatial = [r.name for r in rows if len(r.out_shape) == 3 and ":" not in r.name]
    top = [s for s in spatial if s.count(".") == 0 and s != "features"]
    if "features" in names:
        top = [s for s in spatial if s.startswith("features.") and s.count(".") == 1] or top
    pool = top if len(top) >= n else spatial
    if not pool:
        raise ValueError("found no layer with a spatial output; pass layers= explicitly")
    idx = np.unique(np.linspace(0, len(pool) - 1, num=min(n, len(pool))).round().astype(int))
    return [pool[i] for i in idx]


def choose_filters(result: TopK, n: int) -> np.ndarray:
    """Channels with the strongest top-1 score, strongest first; dead channels (score <= 0) excluded."""
    best = result.scores[:, 0].astype(np.float64)
    best = np.where(result.image_index[:, 0] < 0, -np.inf, best)
    order = np.argsort(-best, kind="stable")
    order = order[best[order] > 0]
    return order[:n]


def _fit_tile(tile: np.ndarray, side: int) -> np.ndarray:
    """Resize an HWC tile (NaN = padding) to at most ``side`` pixels, keeping NaN where padding was."""
    from skimage.transform import resize

    h, w = tile.shape[:2]
    if max(h, w) <= side:
        return tile
    shape = _fit_shape((h, w), side) + (tile.shape[2],)
    pad = np.isnan(tile)
    img = resize(np.where(pad, 0.0, tile), shape, order=1, anti_aliasing=True, preserve_range=True)
    mask = resize(pad.astype(np.float32), shape, order=0, preserve_range=True) > 0.5
    return np.where(mask, np.nan, img).astype(np.float32)


def effective_side(projections: np.ndarray, centres: np.ndarray, *, energy: float = 0.9) -> np.ndarray:
    """Per unit, the side of the smallest square around ``centres[u]`` holding ``energy`` of ``|projection|``.

    ``projections``: (U, C, H, W); ``centres``: (U, 2) (row, col) in pixels. A projection that is
    all zero gets side 1. This is the *effective* receptive field of the unit on that image,
    usually much smaller than the theoretical one of deep layers.
    """
    mag = np.abs(projections).sum(1)  # (U, H, W)
    U, H, W = mag.shape
    integral = np.zeros((U, H + 1, W + 1))
    integral[:, 1:, 1:] = mag.cumsum(1).cumsum(2)
    total = integral[:, -1, -1]
    sides = np.ones(U, dtype=np.int64)
    for u in range(U):
        if total[u] <= 0:
            continue
        cy, cx = centres[u]
        for r in range(0, max(H, W) * 2):
            y0, y1 = int(np.clip(round(cy - r), 0, H)), int(np.clip(round(cy + r) + 1, 0, H))
            x0, x1 = int(np.clip(round(cx - r), 0, W)), int(np.clip(round(cx + r) + 1, 0, W))
            inside = integral[u, y1, x1] - integral[u, y0, x1] - integral[u, y1, x0] + integral[u, y0, x0]
            if inside >= energy * total[u]:
                sides[u] = 2 * r + 1
                break
    return sides


class FeatureTiles(NamedTuple):
    """Tiles of one Fig.-2 panel: ``projections`` and ``patches`` (F, k, t, t, 3), NaN = outside the image."""

    projections: np.ndarray
    patches: np.ndarray
    side: int  # side of the square crop in input pixels (before any downsampling to ``tile``)


def feature_tiles(model: LoadedModel, images: ImageSet, layer: str, result: TopK, channels: Sequence[int], *,
                  method: str = "deconvnet", tile: int = TILE, crop: str | int = "effective", energy: float = 0.9,
                  batch: torch.Tensor | None = None) -> FeatureTiles:
    """Projection and patch tiles for the top-k activations of each of ``channels``.

    Each unit's projection and image patch are cut out around the centre of its receptive field,
    with one square side per layer: ``crop="theoretical"`` uses the layer's theoretical receptive
    field; ``crop="effective"`` (default) the median over the panel's units of the square holding
    ``energy`` (90%) of the projection's magnitude (:func:`effective_side`), never larger than
    the theoretical field; an int gives the side directly (e.g. to compare methods on the same
    crop). Deep layers of modern CNNs have theoretical fields far larger than the image while
    their projections concentrate near the centre, so the effective crop is what makes the detail
    visible. Tiles larger than ``tile`` pixels are downsampled. Each projection tile is
    contrast-normalised on its own crop by :func:`vizlearn.display_projection` (99th percentile
    of the magnitude -> full scale).
    """
    if not (crop in ("effective", "theoretical") or (isinstance(crop, int) and crop >= 1)):
        raise ValueError(f"crop must be 'effective', 'theoretical' or a positive int, got {crop!r}")
    theory = receptive_field(model, layer, input_size=model.input_size, in_channels=len(model.mean))
    k = result.scores.shape[1]
    units, slots = [], []
    for f, ch in enumerate(channels):
        for j in range(k):
            idx = int(result.image_index[ch, j])
            if idx >= 0:
                units.append((idx, int(ch), tuple(int(v) for v in result.position[ch, j])))
                slots.append((f, j))
    x = batch if batch is not None else to_tensor(images.images, mean=model.mean, std=model.std)
    proj = project_units(model, x, layer, units, method=method).cpu().numpy() if units else None
    if isinstance(crop, int):
        side = crop
    elif crop == "effective" and units:
        centres = np.array([[theory.start[0] + r * theory.jump[0], theory.start[1] + c * theory.jump[1]]
                            for _, _, (r, c) in units])
        side = max(1, min(int(np.median(effective_side(proj, centres, energy=energy))) | 1, *theory.size))
    else:
        side = max(theory.size)
    field_ = Field(size=(side, side), jump=theory.jump, start=theory.start)
    hw = tuple(field_.size) if side <= tile else _fit_shape(field_.size, tile)
    out_shape = (len(channels), k) + hw + (3,)
    proj_tiles = np.full(out_shape, np.nan, np.float32)
    patch_tiles = np.full(out_shape, np.nan, np.float32)
    for u, ((idx, ch, pos), (f, j)) in enumerate(zip(units, slots)):
        raw = crop_patch(proj[u].transpose(1, 2, 0), field_, pos, fill=np.nan)
        pad = np.isnan(raw)
        shown = display_projection(np.where(pad, 0.0, raw).transpose(2, 0, 1), percentile=99.0)
        shown = np.repeat(shown[..., None], 3, -1) if shown.ndim == 2 else shown[..., :3]  # 1 ch: grey; 4: RGB
        shown = np.where(pad.any(-1, keepdims=True), np.nan, shown)
        patch = crop_patch(images.images[idx], field_, pos, fill=np.nan)
        proj_tiles[f, j] = _fit_tile(shown, tile)
        patch_tiles[f, j] = _fit_tile(patch, tile)
    return FeatureTiles(proj_tiles, patch_tiles, side)


def _fit_shape(size: tuple[int, int], side: int) -> tuple[int, int]:
    h, w = size
    return round(h * side / max(h, w)), round(w * side / max(h, w))
