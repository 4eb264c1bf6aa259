"""Invariance of features to translation, scale and rotation (Zeiler & Fergus 2014, Fig. 5).

Each image is transformed along a sweep of one transform:

* ``"translate"``: vertical shift by an integer number of pixels (positive = content moves
  down); exact (no interpolation), the uncovered rows are filled with ``fill``;
* ``"scale"``: zoom about the image centre by a factor (1 = unchanged; > 1 zooms in and crops,
  < 1 shrinks and pads with ``fill``), bilinear;
* ``"rotate"``: rotation about the centre in degrees (counter-clockwise), bilinear, corners filled
  with ``fill``; multiples of 90 degrees on square images are exact (``torch.rot90``).

The parameter value that means "no change" returns the image itself, bit for bit. For each
layer the feature vector is the layer's whole output flattened; the reported distance is

    d = || f(T x) - f(x) ||_2 / || f(x) ||_2        (relative Euclidean distance)

so that layers of different size and scale are comparable (0 = unchanged, 1 = a change as large
as the feature vector itself; NaN if f(x) = 0). ``prob`` is the softmax probability of the
*original* top-1 class of each image on the transformed image. ``fill`` is given in pixel
space (default: the model's mean, i.e. zero after normalisation) and normalised like the input;
transforms are applied to the normalised tensor (they commute with per-channel normalisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from .capture import capture, select_output
from ._results import load_dataclass, save_dataclass
from .layers import module_device, resolve_layer, unwrap_model
from .occlusion import _categories, _mean_std, _pixel_fill, _pixel_input, square_crop
from .state import analysis_mode

__all__ = ["InvarianceResult", "invariance", "transform_images", "default_steps", "run_invariance"]

TRANSFORMS = ("translate", "scale", "rotate")
IDENTITY = {"translate": 0.0, "scale": 1.0, "rotate": 0.0}


@dataclass(frozen=True)
class InvarianceResult:
    """Sweeps over ``transforms`` for N images and L layers."""

    layers: tuple  # (L,) layer keys
    transforms: tuple  # transform names, e.g. ("translate", "scale", "rotate")
    steps: dict  # transform -> (S,) float64 parameter values (px, factor, degrees)
    distance: dict  # transform -> (S, N, L) float32 relative Euclidean distance
    prob: dict  # transform -> (S, N) float32 P(original top-1 class)
    top1: dict  # transform -> (S, N) int64 top-1 label of the transformed image
    label: np.ndarray  # (N,) int64 original top-1 label
    names: tuple  # (N,) image names
    fill: tuple  # pixel-space fill per channel
    class_names: tuple | None = None

    def save(self, path) -> Path:
        return save_dataclass(self, path)

    @classmethod
    def load(cls, path) -> "InvarianceResult":
        return load_dataclass(cls, path)

    def summary(self) -> dict:
        """Mean distance per layer and mean probability at the extreme steps, per transform."""
        out = {}
        for t in self.transforms:
            d = self.distance[t]
            out[t] = {"steps": self.steps[t].tolist(),
                      "mean_distance": {ly: np.nanmean(d[:, :, i], 1).round(4).tolist()
                                        for i, ly in enumerate(self.layers)},
                      "mean_prob": self.prob[t].mean(1).round(4).tolist()}
        return out


def default_steps(transform: str, height: int) -> np.ndarray:
    """Paper-like sweeps: +-27% of the height in 13 steps (-60..60 px at 224), 0.6..1.8, 0..360 by 15."""
    if transform == "translate":
        return np.array(sorted({round(height * k * 0.045) for k in range(-6, 7)}), dtype=np.float64)
    if transform == "scale":
        return np.round(np.linspace(0.6, 1.8, 13), 3)
    if transform == "rotate":
        return np.arange(0, 361, 15, dtype=np.float64)
    raise ValueError(f"unknown transform {transform!r}; choose from {TRANSFORMS}")


def transform_images(x: torch.Tensor, transform: str, value: float, fill) -> torch.Tensor:
    """Apply one transform to a batch (N, C, H, W); ``fill`` = per-channel value in x's space."""
    fill = [float(f) for f in fill]
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose from {TRANSFORMS}")
    if float(value) == IDENTITY[transform] or (transform == "rotate" and float(value) % 360 == 0):
        return x
    h, w = x.shape[-2:]
    fill_t = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if transform == "translate":
        dy = int(round(value))
        if dy != value:
            raise ValueError(f"translation must be a whole number of pixels, got {value}")
        out = fill_t.expand_as(x).clone()
        if abs(dy) < h:
            if dy > 0:
                out[:, :, dy:] = x[:, :, :h - dy]
            else:
                out[:, :, :h + dy] = x[:, :, -dy:]
        return out
    if transform == "scale":
        if value <= 0:
            raise ValueError(f"scale factor must be positive, got {value}")
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=float(value), shear=[0.0, 0.0],
                         interpolation=InterpolationMode.BILINEAR, fill=fill)
    if h == w and float(value) % 90 == 0:
        return torch.rot90(x, int(value // 90) % 4, dims=(2, 3))
    return TF.rotate(x, float(value), interpolation=InterpolationMode.BILINEAR, fill=fill)


def _prepare_batch(images, model, mean, std):
    """Images -> (normalised (N,C,H,W) float32 tensor, names, mean, std).

    Accepts an ImageSet-like object (``.images`` (N,H,W,3) and ``.names``), a list of
    ``(name, HWC array)`` pairs, a list of HWC arrays, an (N,H,W,C) array (pixel space [0,1]),
    or a normalised (N,C,H,W) tensor.
    """
    names = None
    if hasattr(images, "images") and hasattr(images, "names"):
        names, images = tuple(images.names), images.images
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"image tensor must be (N,C,H,W), got shape {tuple(images.shape)}")
        x = images.detach().to(torch.float32).cpu().clone()
        mean, std = _mean_std(model, mean, std, x.shape[1])
    else:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given")
            if all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in images):
                names = tuple(p[0] for p in images)
                images = [p[1] for p in images]
            shapes = {np.shape(a) for a in images}
            if len(shapes) != 1:
                raise ValueError(f"images must all have the same size, got shapes {sorted(shapes)}; "
                                 "crop them first (e.g. vizlearn.occlusion.square_crop)")
            images = np.stack([np.asarray(a) for a in images])
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be arrays, (name, array) pairs, an ImageSet or a tensor, "
                            f"got {type(images).__name__}")
        a = images[..., None] if images.ndim == 3 else images
        if a.ndim != 4 or a.shape[-1] not in (1, 3):
            raise ValueError(f"image array must be (N,H,W,C) with C in (1, 3), got shape {images.shape}")
        x, _, mean, std = _pixel_input(a, model, mean, std)
    if x.shape[0] == 0:
        raise ValueError("no images given")
    if names is None:
        names = tuple(f"image {i}" for i in range(x.shape[0]))
    return x.contiguous(), names, mean, std


def _layer_features(module, x, keys, batch_size):
    """({key: (N, D) float64 flattened features}, [model output per batch]), batch by batch."""
    feats = {k: [] for k in keys}
    outs = []
    for i in range(0, x.shape[0], batch_size):
        with capture(module, keys) as acts:
            outs.append(module(x[i:i + batch_size]))
        for k in keys:
            feats[k].append(acts[k].flatten(1).double())
    return {k: torch.cat(v) for k, v in feats.items()}, outs


def _features(module, x, keys, select, batch_size):
    """{key: (N, D) float64 flattened features}, (N, K) probabilities."""
    feats, outs = _layer_features(module, x, keys, batch_size)
    probs = [torch.softmax(select_output(o, select, where="model output").float(), 1) for o in outs]
    return feats, torch.cat(probs)


def invariance(model, images, *, layers, transforms=TRANSFORMS, steps: dict | None = None, fill=None,
               mean=None, std=None, batch_size: int = 32, select=None) -> InvarianceResult:
    """Feature distance and class probability along transform sweeps (module docstring).

    ``layers``: layer names (e.g. a shallow and a deep one). ``steps``: optional
    ``{transform: values}`` overriding :func:`default_steps`. ``fill``: pixel-space value(s) for
    uncovered pixels (default: the model's mean). The model is left as found.
    """
    module = unwrap_model(model)
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise ValueError("give at least one layer")
    keys = [resolve_layer(module, ly).key for ly in layers]
    if isinstance(transforms, str):
        transforms = (transforms,)
    for t in transforms:
        if t not in TRANSFORMS:
            raise ValueError(f"unknown transform {t!r}; choose from {TRANSFORMS}")
    x, names, mean, std = _prepare_batch(images, model, mean, std)
    c, h = x.shape[1], x.shape[2]
    fill_px, fill_n = _pixel_fill(fill, c, mean, std)
    device = module_device(module)
    x = x.to(device)
    sweeps = {}
    for t in transforms:
        v = np.asarray((steps or {}).get(t, default_steps(t, h)), dtype=np.float64).reshape(-1)
        if v.size == 0:
            raise ValueError(f"no steps for transform {t!r}")
        sweeps[t] = v
    distance, prob, top1 = {}, {}, {}
    with analysis_mode(module), torch.inference_mode():
        f0, p0 = _features(module, x, keys, select, batch_size)
        label = p0.argmax(1)
        norms = {k: f0[k].norm(dim=1) for k in keys}
        for t, vals in sweeps.items():
            d = np.zeros((len(vals), x.shape[0], len(keys)), dtype=np.float32)
            pr = np.zeros((len(vals), x.shape[0]), dtype=np.float32)
            tp = np.zeros((len(vals), x.shape[0]), dtype=np.int64)
            for s, val in enumerate(vals):
                xt = transform_images(x, t, val, fill_n)
                ft, pt = _features(module, xt, keys, select, batch_size)
                for li, k in enumerate(keys):
                    diff = (ft[k] - f0[k]).norm(dim=1)
                    d[s, :, li] = torch.where(norms[k] > 0, diff / norms[k].clamp_min(1e-300),
                                              torch.full_like(diff, float("nan"))).cpu().numpy()
                pr[s] = pt.gather(1, label[:, None])[:, 0].cpu().numpy()
                tp[s] = pt.argmax(1).cpu().numpy()
            distance[t], prob[t], top1[t] = d, pr, tp
    return InvarianceResult(layers=tuple(keys), transforms=tuple(sweeps), steps=sweeps, distance=distance,
                            prob=prob, top1=top1, label=label.cpu().numpy().astype(np.int64), names=names,
                            fill=fill_px, class_names=_categories(model))


def default_layers(model) -> tuple[str, ...]:
    """A shallow, a middle and a deep layer (timm EfficientNet: stem, blocks.3, pooled features)."""
    module = unwrap_model(model)
    names = dict(module.named_modules())
    if {"bn1", "blocks", "global_pool"} <= set(names):
        return ("bn1", "blocks.3", "global_pool")
    from .layers import list_layers

    size = getattr(model, "input_size", None) or 224
    infos = [i for i in list_layers(module, input_size=size, receptive_fields=False) if i.out_shape]
    spatial = [i.name for i in infos if len(i.out_shape) == 3]
    flat = [i.name for i in infos if len(i.out_shape) == 1]
    deep = flat[-2] if len(flat) >= 2 else (spatial[-1] if spatial else infos[-1].name)
    return (spatial[1] if len(spatial) > 1 else spatial[0], deep)


def run_invariance(loaded, photos, out_dir, *, layers=None, transforms=TRANSFORMS, steps=None,
                   input_size: int | None = None) -> InvarianceResult:
    """Invariance experiment on ``photos`` (``(name, HWC)`` pairs, centre-cropped to the input
    size); writes ``invariance.png`` and ``invariance.npz/.json`` (+ ``invariance_summary.json``)."""
    import json

    from .plot_experiments import plot_invariance

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    side = input_size or getattr(loaded, "input_size", None) or 224
    crops = [(name, square_crop(img, side)) for name, img in photos]
    res = invariance(loaded, crops, layers=layers or default_layers(loaded), transforms=transforms, steps=steps)
    res.save(out / "invariance")
    (out / "invariance_summary.json").write_text(json.dumps(res.summary(), indent=1))
    plot_invariance(res).savefig(out / "invariance.png", dpi=110)
    return res

