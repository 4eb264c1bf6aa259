"""Occlusion sensitivity (Zeiler & Fergus 2014, Fig. 7).

A square occluder (``size`` x ``size`` pixels, filled with ``fill`` given in *pixel* space and
normalised with the model's mean/std exactly like the input) slides over the image with
``stride``. For every occluder position (a *window*) one forward pass gives

(a) the probability of the ``target`` class (default: the top-1 class of the unoccluded image),
(b) the full class-probability vector (for the most-probable-label map),
(c) optionally, the total activation (spatial sum) of the feature map of ``layer`` that is
    strongest (largest spatial maximum) on the unoccluded image; that map's deconvnet
    projection is computed once, on the unoccluded image.

Window values become maps exactly the size of the input: each pixel gets the mean over the
windows that cover it. Window starts along an axis are ``0, stride, 2*stride, ...``; with
``align_last=True`` (default) a last window flush with the border is added when needed, so
every pixel is covered; with ``align_last=False`` (captum's grid) uncovered pixels are NaN in
the float maps, -1 in the label map and False in ``covered``.
The most-probable-label map is, per pixel, the argmax of the class-probability vector averaged
over the covering windows (ties: lowest class index).

Occluded copies are built and evaluated ``chunk`` at a time (bounded memory); every window is
computed independently, so the maps do not depend on ``chunk`` (up to float rounding of the
batched convolution, which is below 1e-6 here).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._results import load_dataclass, save_dataclass
from .capture import capture, select_output
from .images import to_tensor
from .layers import module_device, resolve_layer, unwrap_model
from .state import analysis_mode

__all__ = ["OcclusionResult", "occlusion", "window_starts", "windows_to_map", "windows_to_label_map", "run_occlusion"]


# ----------------------------------------------------------------------------------------------
# small shared helpers (also used by invariance / correspondence / evolution / layer1)
# ----------------------------------------------------------------------------------------------

def _mean_std(model, mean, std, channels: int):
    """Mean/std for normalisation: explicit arguments, else the LoadedModel's, else identity."""
    if mean is None:
        mean = getattr(model, "mean", None)
    if std is None:
        std = getattr(model, "std", None)
    mean = (0.0,) if mean is None else tuple(float(m) for m in np.atleast_1d(mean))
    std = (1.0,) if std is None else tuple(float(s) for s in np.atleast_1d(std))
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for a {channels}-channel input")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


def _pixel_input(a: np.ndarray, model, mean, std):
    """Pixel-space images (N, H, W, C), uint8 or float in [0, 1] -> (normalised (N, C, H, W) float32
    tensor, the pixels as float32 (N, H, W, C), mean, std)."""
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"image array must be float in [0, 1] or uint8, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError("image contains NaN or infinite values")
    a = np.ascontiguousarray(a, dtype=np.float32)
    mean, std = _mean_std(model, mean, std, a.shape[-1])
    return to_tensor(a, mean=mean, std=std), a, mean, std


def _pixel_fill(fill, channels: int, mean, std):
    """Pixel-space fill (a scalar or one value per channel; None = the mean) -> (pixel tuple, normalised tuple)."""
    fill_px = tuple(mean) if fill is None else tuple(float(f) for f in np.atleast_1d(fill))
    if len(fill_px) == 1:
        fill_px = fill_px * channels
    if len(fill_px) != channels:
        raise ValueError(f"fill has {len(fill_px)} values for a {channels}-channel image")
    return fill_px, tuple((f - m) / s for f, m, s in zip(fill_px, mean, std))


def _prepare_image(image, mean, std, model):
    """One image -> (normalised input (1,C,H,W) float32, display HWC [0,1], mean, std).

    ``image``: numpy HWC (or HW) in [0, 1] (float) or uint8 -- pixel space, normalised here --,
    or a torch tensor (C,H,W) / (1,C,H,W) that is already the normalised model input.
    """
    if isinstance(image, torch.Tensor):
        x = image.detach()
        if x.ndim == 4:
            if x.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {x.shape[0]}; pass them one by one")
            x = x[0]
        if x.ndim != 3:
            raise ValueError(f"image tensor must be (C,H,W) or (1,C,H,W), got shape {tuple(image.shape)}")
        x = x.to(torch.float32).cpu()
        mean, std = _mean_std(model, mean, std, x.shape[0])
        m = torch.tensor(mean).view(-1, 1, 1)
        s = torch.tensor(std).view(-1, 1, 1)
        disp = (x * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
        return x[None].clone(), np.ascontiguousarray(disp, dtype=np.float32), mean, std
    if isinstance(image, np.ndarray):
        a = image[:, :, None] if image.ndim == 2 else image
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise ValueError(f"image array must be HWC (H, W, 1|3) or HW, got shape {image.shape}")
        x, a, mean, std = _pixel_input(a[None, :, :, :3], model, mean, std)  # RGBA: alpha dropped
        return x, np.clip(a[0], 0, 1), mean, std
    raise TypeError(f"image must be a numpy array (HWC, pixel space) or a torch tensor (normalised), "
                    f"got {type(image).__name__}")


def _categories(model):
    cats = getattr(model, "categories", None)
    return tuple(cats) if cats else None


# ----------------------------------------------------------------------------------------------
# window geometry
# ----------------------------------------------------------------------------------------------

def window_starts(length: int, size: int, stride: int, *, align_last: bool = True) -> np.ndarray:
    """Start offsets of the occluder along one axis: ``0, stride, ...`` (+ one flush with the end)."""
    if size > length:
        raise ValueError(f"occluder size {size} is larger than the image side {length}")
    starts = list(range(0, length - size + 1, stride))
    if align_last and starts[-1] + size < length:
        starts.append(length - size)
    return np.asarray(starts, dtype=np.int64)


def _cover_ranges(starts: np.ndarray, size: int, length: int):
    """For every pixel ``p`` of an axis, the covering windows are ``starts[a[p]:b[p]]``."""
    p = np.arange(length)
    a = np.searchsorted(starts + size, p, side="right")  # first window whose end is > p
    b = np.searchsorted(starts, p, side="right")  # windows with start <= p
    return a, np.maximum(b, a)


def _rect_means(values, rows, cols, size, shape):
    """Means over covering windows for each distinct (row range, col range): (Uy, Ux, *extra), iy, ix."""
    h, w = shape
    v = np.asarray(values, dtype=np.float64)
    ny, nx = len(rows), len(cols)
    cs = np.zeros((ny + 1, nx + 1) + v.shape[2:])
    cs[1:, 1:] = v.cumsum(0).cumsum(1)
    ay, by = _cover_ranges(rows, size, h)
    ax, bx = _cover_ranges(cols, size, w)
    # distinct (a, b) ranges per axis -> compute each rectangle mean once, then broadcast
    ry, iy = np.unique(np.stack([ay, by], 1), axis=0, return_inverse=True)
    rx, ix = np.unique(np.stack([ax, bx], 1), axis=0, return_inverse=True)
    a0, b0 = ry[:, 0][:, None], ry[:, 1][:, None]
    a1, b1 = rx[:, 0][None, :], rx[:, 1][None, :]
    total = cs[b0, b1] - cs[a0, b1] - cs[b0, a1] + cs[a0, a1]
    count = ((b0 - a0) * (b1 - a1)).astype(np.float64)
    count = count.reshape(count.shape + (1,) * (v.ndim - 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
    return mean, iy.reshape(-1), ix.reshape(-1)


def windows_to_map(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int, shape) -> np.ndarray:
    """Average per-window ``values`` (ny, nx, *extra) over the windows covering each pixel.

    Returns (H, W, *extra) float64; pixels covered by no window are NaN.
    """
    mean, iy, ix = _rect_means(values, rows, cols, size, shape)
    return mean[iy][:, ix]


def windows_to_label_map(probs: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int, shape) -> np.ndarray:
    """Per pixel, the argmax of the class probabilities (ny, nx, K) averaged over the covering windows
    (ties: lowest index); -1 where no window covers the pixel. Never builds an (H, W, K) array."""
    mean, iy, ix = _rect_means(probs, rows, cols, size, shape)
    covered = np.isfinite(mean[..., 0])
    lab = np.where(covered, np.where(np.isfinite(mean), mean, -np.inf).argmax(-1), -1)
    return lab[iy][:, ix].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OcclusionResult:
    """Occlusion maps of one image; every map has the input's height and width."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1], the unoccluded image for display
    prob: np.ndarray  # (H, W) float32, P(target) averaged over covering windows (NaN: uncovered)
    label: np.ndarray  # (H, W) int64, most probable label of the averaged probabilities (-1: uncovered)
    covered: np.ndarray  # (H, W) bool, pixel covered by at least one window
    rows: np.ndarray  # (ny,) int64 window start rows
    cols: np.ndarray  # (nx,) int64 window start columns
    window_prob: np.ndarray  # (ny, nx) float32 P(target) per occluder position
    window_label: np.ndarray  # (ny, nx) int64 top-1 label per occluder position
    size: int
    stride: int
    fill: tuple  # pixel-space fill value per channel
    target: int
    base_prob: float  # P(target) on the unoccluded image
    base_label: int  # top-1 label on the unoccluded image
    class_names: tuple | None = None  # model categories (None if unknown)
    activity: np.ndarray | None = None  # (H, W) float32 total activation of the strongest map of `layer`
    window_activity: np.ndarray | None = None  # (ny, nx) float32
    base_activity: float | None = None  # that total on the unoccluded image
    projection: np.ndarray | None = None  # (H, W, C) float32 deconvnet projection of the strongest unit
    layer: str | None = None
    channel: int | None = None  # strongest feature map of `layer` on the unoccluded image
    position: tuple | None = None  # (row, col) of its maximum in the feature map
    name: str = ""
    seconds: float = 0.0  # wall time of the occlusion sweep

    def name_of(self, label: int) -> str:
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return str(self.class_names[label])
        return f"class {label}"

    @property
    def uncovered(self) -> int:
        """Number of pixels no window covers (0 with ``align_last=True``)."""
        return int((~self.covered).sum())

    def save(self, path) -> Path:
        return save_dataclass(self, path)

    @classmethod
    def load(cls, path) -> "OcclusionResult":
        return load_dataclass(cls, path)


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------

def _check_int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def occlusion(model, image, *, target: int | None = None, size: int | None = None, stride: int | None = None,
              fill: float | tuple = 0.5, layer: str | None = None, chunk: int = 64, mean=None, std=None,
              align_last: bool = True, project_strongest: bool = True, select=None,
              channels_last: bool = True, name: str = "") -> OcclusionResult:
    """Occlusion sensitivity maps of one image (see the module docstring).

    ``model``: an ``nn.Module`` or a ``LoadedModel`` (its mean/std/categories are used).
    ``image``: numpy HWC in [0, 1] (pixel space) or a normalised tensor (C,H,W) / (1,C,H,W).
    ``size``/``stride`` default to ~1/7 and ~1/14 of the shorter side (32/16 at 224 px).
    ``fill``: occluder value in pixel space (a scalar or one value per channel), normalised with
    ``mean``/``std`` (default: the LoadedModel's; identity for a plain module).
    ``layer``: also compute the activity map of its strongest feature map and its projection.
    ``select``: picks the logits tensor out of a tuple/dict model output.
    ``channels_last``: feed the occluded batches in channels-last memory layout (the model is not
    changed); oneDNN's CPU convolutions run faster that way (EfficientNet-Lite0, batch 32 at 224 px:
    2.2 s instead of 3.4 s); results equal the contiguous layout up to float rounding (~1e-6).
    The caller's model is left as found (eval mode and out-of-place rectifiers only inside).
    """
    module = unwrap_model(model)
    x, disp, mean, std = _prepare_image(image, mean, std, model)
    _, c, h, w = x.shape
    short = min(h, w)
    size = max(1, round(short / 7)) if size is None else _check_int("size", size)
    stride = max(1, size // 2) if stride is None else _check_int("stride", stride)
    chunk = _check_int("chunk", chunk)
    if size > h or size > w:
        raise ValueError(f"occluder size {size} does not fit the {h}x{w} image")
    fill_t, fill_n = _pixel_fill(fill, c, mean, std)
    ref = resolve_layer(module, layer) if layer is not None else None
    rows = window_starts(h, size, stride, align_last=align_last)
    cols = window_starts(w, size, stride, align_last=align_last)
    device = module_device(module)
    x = x.to(device)
    fill_norm = torch.tensor(fill_n, dtype=x.dtype, device=device)

    t0 = time.perf_counter()
    with analysis_mode(module), torch.inference_mode():
        base_logits, base_act = _forward(module, x.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format), ref, select)
        base_p = torch.softmax(base_logits.float(), dim=1)[0]
        n_classes = base_p.numel()
        base_label = int(base_p.argmax())
        if target is None:
            target = base_label
        target = _check_int("target", target, lo=0)
        if target >= n_classes:
            raise ValueError(f"target {target} is out of range for {n_classes} classes")
        channel = position = None
        if ref is not None:
            fmap = base_act[0].float()
            if fmap.ndim != 3:
                raise ValueError(f"layer {layer!r} output has shape {tuple(base_act.shape)}; the activity map "
                                 "needs a spatial (N, C, H, W) feature map")
            channel = int(fmap.flatten(1).amax(1).argmax())
            flat = int(fmap[channel].flatten().argmax())
            position = (flat // fmap.shape[2], flat % fmap.shape[2])
            base_activity = float(fmap[channel].sum())
        ys = np.repeat(rows, len(cols))
        xs = np.tile(cols, len(rows))
        n = len(ys)
        probs = torch.empty(n, n_classes, dtype=torch.float32)
        acts = torch.empty(n, dtype=torch.float32)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for i0 in range(0, n, chunk):
            i1 = min(n, i0 + chunk)
            xb = x.expand(i1 - i0, -1, -1, -1).clone(memory_format=fmt)
            for k in range(i1 - i0):
                y0, x0 = int(ys[i0 + k]), int(xs[i0 + k])
                xb[k, :, y0:y0 + size, x0:x0 + size] = fill_norm[:, None, None]
            logits, act = _forward(module, xb, ref, select)
            probs[i0:i1] = torch.softmax(logits.float(), dim=1).cpu()
            if ref is not None:
                acts[i0:i1] = act[:, channel].float().sum((1, 2)).cpu()
    seconds = time.perf_counter() - t0

    ny, nx = len(rows), len(cols)
    pw = probs.numpy().reshape(ny, nx, n_classes)
    prob_map = windows_to_map(pw[:, :, target], rows, cols, size, (h, w))
    covered = np.isfinite(prob_map)
    label_map = windows_to_label_map(pw, rows, cols, size, (h, w))
    extra = {}
    if ref is not None:
        aw = acts.numpy().reshape(ny, nx)
        extra = dict(activity=windows_to_map(aw, rows, cols, size, (h, w)).astype(np.float32),
                     window_activity=aw.astype(np.float32), base_activity=base_activity,
                     layer=ref.key, channel=channel, position=position)
        if project_strongest:
            extra["projection"] = _project_unit(module, x, ref.key, channel, position)
    return OcclusionResult(
        image=disp, prob=prob_map.astype(np.float32), label=label_map, covered=covered, rows=rows, cols=cols,
        window_prob=pw[:, :, target].astype(np.float32), window_label=pw.argmax(-1).astype(np.int64),
        size=size, stride=stride, fill=fill_t, target=target, base_prob=float(base_p[target]),
        base_label=base_label, class_names=_categories(model), name=name, seconds=seconds, **extra)


def _forward(module, x, ref, select):
    if ref is None:
        return select_output(module(x), select, where="model output"), None
    with capture(module, [ref.key]) as acts:
        out = module(x)
    return select_output(out, select, where="model output"), acts[ref.key]


def _project_unit(module, x, layer, channel, position):
    """Deconvnet projection (H, W, C) of one unit on the unoccluded image (vizlearn.projection)."""
    from .projection import project

    with analysis_mode(module):
        p = project(module, x, layer, channel, position=tuple(position), method="deconvnet")
    return p[0].detach().float().permute(1, 2, 0).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------

def default_layer(model) -> str | None:
    """A 'layer 5'-like layer: the deepest layer whose grid is still >= 1/16 of the input side
    (the paper's layer 5: 13x13 at stride 16). timm EfficientNets: ``blocks.3`` (14x14 at 224 px;
    deconvnet projections of the 7x7 layers of EfficientNet-Lite0 spread over the whole image)."""
    module = unwrap_model(model)
    names = dict(module.named_modules())
    if {"conv_stem", "blocks.3", "conv_head"} <= set(names):
        return "blocks.3"
    from .layers import list_layers

    size = getattr(model, "input_size", None) or 224
    best = None
    for info in list_layers(module, input_size=size, receptive_fields=False):
        if len(info.out_shape) == 3 and min(info.out_shape[1:]) >= size // 16:
            best = info.name
    return best


def run_occlusion(loaded, photos, out_dir, *, size: int | None = None, stride: int | None = None,
                  layer: str | None = "auto", fill=0.5, chunk: int = 64, input_size: int | None = None,
                  targets: dict | None = None) -> list[OcclusionResult]:
    """Occlusion experiment for each ``(name, HWC image)`` in ``photos``; writes into ``out_dir``:
    ``occlusion.png`` (five-panel row per photo) and ``occlusion_<name>.npz/.json`` per photo.

    Photos are resized (shorter side) and centre-cropped to the model's input size.
    ``size``/``stride`` default to 1/4 and 1/16 of the input side (56 / 14 px at 224: 169 positions).
    ``layer="auto"`` picks :func:`default_layer`; ``None`` skips the activity map.
    ``targets``: optional ``{photo name: class index}`` (default: top-1 on the unoccluded photo).
    """
    from .plot_experiments import plot_occlusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    side = input_size or getattr(loaded, "input_size", None) or 224
    if layer == "auto":
        layer = default_layer(loaded)
    size = size or max(1, side // 4)
    stride = stride or max(1, side // 16)
    results = []
    for name, img in photos:
        im = square_crop(img, side)
        r = occlusion(loaded, im, size=size, stride=stride, fill=fill, layer=layer, chunk=chunk,
                      target=(targets or {}).get(name), name=name)
        r.save(out / f"occlusion_{_safe(name)}")
        results.append(r)
    fig = plot_occlusion(results)
    fig.savefig(out / "occlusion.png", dpi=110)
    return results


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name)) or "image"


def square_crop(image: np.ndarray, side: int) -> np.ndarray:
    """Resize the shorter side to ``side`` (anti-aliased) and centre-crop to ``side`` x ``side``."""
    from skimage.transform import resize

    a = np.asarray(image)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    h, w = a.shape[:2]
    s = side / min(h, w)
    nh, nw = max(side, round(h * s)), max(side, round(w * s))
    r = resize(a, (nh, nw) + a.shape[2:], anti_aliasing=s < 1, preserve_range=True).astype(np.float32)
    y0, x0 = (nh - side) // 2, (nw - side) // 2
    return np.clip(r[y0:y0 + side, x0:x0 + side], 0, 1)
