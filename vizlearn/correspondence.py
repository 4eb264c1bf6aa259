"""Correspondence analysis (Zeiler & Fergus 2014, Sec. 4.2, Table 1).

Does the network implicitly relate the *same object part* across different images? Mask the
same part (one box per image, e.g. the left eye in five dog photos) with ``fill`` and measure,
per layer, how consistently the features change:

    eps_i  = f(x_i) - f(x~_i)                 (feature difference caused by the mask, flattened)
    s_i    = sign(eps_i)                      (entries with |eps| <= tol * max|f(x_i)| count as 0)
    Delta  = mean over ordered pairs i != j of  H(s_i, s_j) / D

where H is the Hamming distance (number of differing entries) and D the feature length. The
paper sums H over the pairs; we divide by the number of pairs and by D so that Delta lies in
[0, 1] and layers of different size compare (lower = more consistent). The baseline masks a
*random* box of the same size in each image (uniform position, ``n_random`` draws); a part with a
Delta clearly below the random one is treated consistently by that layer. ``tol`` (default 1e-5)
keeps float rounding far from the mask from counting as a sign.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .invariance import _layer_features, _prepare_batch
from ._results import load_dataclass, save_dataclass
from .layers import module_device, resolve_layer, unwrap_model
from .occlusion import _pixel_fill
from .state import analysis_mode

__all__ = ["CorrespondenceResult", "correspondence", "sign_consistency", "run_correspondence"]


@dataclass(frozen=True)
class CorrespondenceResult:
    """Delta per part and layer, and the random-box baseline."""

    layers: tuple  # (L,) layer keys
    parts: tuple  # (P,) part names
    boxes: dict  # part -> (N, 4) int64 boxes (y0, x0, y1, x1), half-open, input pixels
    delta: np.ndarray  # (P, L) float64 mean normalised Hamming distance over pairs
    delta_std: np.ndarray  # (P, L) float64 its standard deviation over pairs
    random_boxes: dict  # part -> (R, N, 4) int64 random boxes of the same sizes
    delta_random: np.ndarray  # (P, R, L) float64 Delta for each random draw
    names: tuple  # (N,) image names
    fill: tuple
    tol: float

    def table(self) -> list[dict]:
        """Rows of Table 1: per part, Delta and random Delta (mean +- std over draws) per layer."""
        rows = []
        for p, part in enumerate(self.parts):
            row = {"part": part}
            for li, ly in enumerate(self.layers):
                r = self.delta_random[p, :, li]
                row[ly] = {"delta": round(float(self.delta[p, li]), 4),
                           "delta_std_pairs": round(float(self.delta_std[p, li]), 4),
                           "random": round(float(r.mean()), 4), "random_std": round(float(r.std()), 4)}
            rows.append(row)
        return rows

    def save(self, path) -> Path:
        return save_dataclass(self, path)

    @classmethod
    def load(cls, path) -> "CorrespondenceResult":
        return load_dataclass(cls, path)


def sign_consistency(eps: np.ndarray) -> tuple[float, float]:
    """(mean, std) over ordered pairs i != j of Hamming(sign rows) / D for ``eps`` (N, D) of signs."""
    s = np.asarray(eps)
    n, d = s.shape
    if n < 2:
        raise ValueError("need at least 2 images to compare")
    vals = []
    for i in range(n):
        diff = (s[i][None, :] != s).sum(1) / d  # (N,)
        vals.extend(np.delete(diff, i).tolist())
    return float(np.mean(vals)), float(np.std(vals))


def _check_boxes(b, n, h, w, part):
    b = np.asarray(b)
    if b.shape != (n, 4):
        raise ValueError(f"part {part!r}: boxes must be (N={n}, 4) as (y0, x0, y1, x1), got shape {b.shape}")
    b = b.astype(np.int64)
    if (b[:, 0] < 0).any() or (b[:, 1] < 0).any() or (b[:, 2] > h).any() or (b[:, 3] > w).any() \
            or (b[:, 2] <= b[:, 0]).any() or (b[:, 3] <= b[:, 1]).any():
        raise ValueError(f"part {part!r}: every box must satisfy 0 <= y0 < y1 <= {h}, 0 <= x0 < x1 <= {w}")
    return b


def _mask(x, boxes, fill_n):
    xm = x.clone()
    for i, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        xm[i, :, y0:y1, x0:x1] = fill_n.view(-1, 1, 1)
    return xm


def _signs(module, f0, xm, keys, tol, batch_size):
    """Per layer, (N, D) int8 signs of f(x) - f(xm) (0 where below ``tol`` * max|f(x)|); ``f0`` = f(x)."""
    f1, _ = _layer_features(module, xm, keys, batch_size)
    out = {}
    for k in keys:
        eps = f0[k] - f1[k]
        scale = f0[k].abs().amax(1, keepdim=True)
        out[k] = (torch.sign(eps) * (eps.abs() > tol * scale)).to(torch.int8).cpu().numpy()
    return out


def correspondence(model, images, parts: dict, *, layers, n_random: int = 10, fill=None, mean=None,
                   std=None, tol: float = 1e-5, seed: int = 0, batch_size: int = 16) -> CorrespondenceResult:
    """Table-1 consistency Delta per part and layer plus a random-box baseline (module docstring).

    ``images``: N >= 2 images of equal size (arrays in [0,1], (name, array) pairs, an ImageSet or
    a normalised tensor). ``parts``: ``{name: (N, 4) boxes (y0, x0, y1, x1)}``, one box per image.
    ``fill``: pixel-space mask value (default: the model's mean). The model is left as found.
    """
    module = unwrap_model(model)
    if isinstance(layers, str):
        layers = [layers]
    keys = [resolve_layer(module, ly).key for ly in layers]
    if not keys:
        raise ValueError("give at least one layer")
    if not isinstance(parts, dict) or not parts:
        raise TypeError("parts must be a non-empty dict {part name: (N, 4) boxes}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be a positive int, got {n_random!r}")
    x, names, mean, std = _prepare_batch(images, model, mean, std)
    n, c, h, w = x.shape
    if n < 2:
        raise ValueError("correspondence needs at least 2 images")
    boxes = {p: _check_boxes(b, n, h, w, p) for p, b in parts.items()}
    fill_px, fill_n = _pixel_fill(fill, c, mean, std)
    device = module_device(module)
    x = x.to(device)
    fill_n = torch.tensor(fill_n, dtype=x.dtype, device=device)
    rng = np.random.default_rng(seed)
    delta = np.zeros((len(boxes), len(keys)))
    delta_std = np.zeros_like(delta)
    delta_random = np.zeros((len(boxes), n_random, len(keys)))
    random_boxes = {}
    with analysis_mode(module), torch.inference_mode():
        f0, _ = _layer_features(module, x, keys, batch_size)  # unmasked features, shared by every mask
        for p, (part, b) in enumerate(boxes.items()):
            signs = _signs(module, f0, _mask(x, b, fill_n), keys, tol, batch_size)
            for li, k in enumerate(keys):
                delta[p, li], delta_std[p, li] = sign_consistency(signs[k])
            bh, bw = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
            rb = np.zeros((n_random, n, 4), dtype=np.int64)
            for r in range(n_random):
                y0 = rng.integers(0, h - bh + 1)
                x0 = rng.integers(0, w - bw + 1)
                rb[r] = np.stack([y0, x0, y0 + bh, x0 + bw], 1)
                signs = _signs(module, f0, _mask(x, rb[r], fill_n), keys, tol, batch_size)
                for li, k in enumerate(keys):
                    delta_random[p, r, li] = sign_consistency(signs[k])[0]
            random_boxes[part] = rb
    return CorrespondenceResult(layers=tuple(keys), parts=tuple(boxes), boxes=boxes, delta=delta,
                                delta_std=delta_std, random_boxes=random_boxes, delta_random=delta_random,
                                names=names, fill=fill_px, tol=float(tol))


# ----------------------------------------------------------------------------------------------
# runner on the built-in cat photo: several views of the same cat, parts located per view
# ----------------------------------------------------------------------------------------------

# Part boxes in skimage's chelsea.png (300 x 451), (y0, x0, y1, x1), located by eye on the photo.
CHELSEA_PARTS = {
    "right eye": (85, 135, 150, 210),
    "left eye": (110, 280, 170, 345),
    "nose": (220, 230, 275, 290),
}
# Views of the photo: (y0, x0, side) square crops of the 300 x 451 original, resized to the input.
CHELSEA_VIEWS = ((0, 60, 300), (20, 100, 270), (40, 120, 240), (0, 100, 300), (30, 90, 260))


def chelsea_views(side: int, photo: np.ndarray | None = None):
    """Square crops of the cat photo resized to ``side`` and the part boxes mapped into each view."""
    from skimage import data
    from skimage.transform import resize

    img = data.chelsea().astype(np.float32) / 255.0 if photo is None else photo
    views, boxes = [], {p: [] for p in CHELSEA_PARTS}
    for y0, x0, s in CHELSEA_VIEWS:
        crop = img[y0:y0 + s, x0:x0 + s]
        views.append((f"cat crop y{y0} x{x0} s{s}",
                      np.clip(resize(crop, (side, side), anti_aliasing=True), 0, 1).astype(np.float32)))
        k = side / s
        for p, (a, b, c, d) in CHELSEA_PARTS.items():
            boxes[p].append([round((a - y0) * k), round((b - x0) * k), round((c - y0) * k), round((d - x0) * k)])
    return views, {p: np.clip(np.array(v), 0, side) for p, v in boxes.items()}


def run_correspondence(loaded, out_dir, *, layers=None, n_random: int = 10, seed: int = 0,
                       input_size: int | None = None) -> CorrespondenceResult:
    """Correspondence experiment on five views of the built-in cat photo (eyes, nose vs random boxes);
    writes ``correspondence.png`` and ``correspondence.npz/.json`` + ``correspondence_table.json``."""
    import json

    from .invariance import default_layers
    from .plot_experiments import plot_correspondence

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    side = input_size or getattr(loaded, "input_size", None) or 224
    views, boxes = chelsea_views(side)
    res = correspondence(loaded, views, boxes, layers=layers or default_layers(loaded), n_random=n_random,
                         seed=seed)
    res.save(out / "correspondence")
    (out / "correspondence_table.json").write_text(json.dumps(res.table(), indent=1))
    note = ("Five crops of the one built-in cat photo (no other cat photos offline): the same part is masked "
            "in each; a weaker test than the paper's five different dogs.")
    plot_correspondence(res, images=np.stack([v for _, v in views]), note=note).savefig(
        out / "correspondence.png", dpi=110)
    return res
