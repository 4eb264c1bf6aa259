"""Figures: numpy in, ``matplotlib.figure.Figure`` out.

Every function here builds a :class:`~matplotlib.figure.Figure` (not pyplot state), so it works
the same in a notebook (the figure displays itself), in a script and in a headless report. No
function shows or saves anything; :mod:`vizlearn.report` saves.

Images are HWC float arrays in [0, 1] (see :func:`vizlearn.images.to_display` to convert
tensors). Patches cut at an image border carry NaN where the receptive field leaves the image;
they are drawn as a light checkerboard so the padding is visible as such.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["filter_grid", "feature_panel", "activation_maps", "predictions", "show_padded", "mosaic", "plot_sanity"]


def _checker(h: int, w: int, cell: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    board = ((yy // cell + xx // cell) % 2).astype(np.float32)
    return 0.75 + 0.15 * board


def show_padded(img: np.ndarray) -> np.ndarray:
    """Replace NaN (out-of-image padding) by a light checkerboard; return an RGB/grey array in [0, 1]."""
    img = np.asarray(img, dtype=np.float32)
    nan = np.isnan(img)
    if not nan.any():
        return np.clip(img, 0, 1)
    board = _checker(img.shape[0], img.shape[1])
    if img.ndim == 3:
        board = np.repeat(board[:, :, None], img.shape[2], axis=2)
    out = np.where(nan, board, img)
    return np.clip(out, 0, 1)


def mosaic(tiles: Sequence[np.ndarray], *, ncols: int | None = None, gap: int = 1, gap_value: float = 1.0) -> np.ndarray:
    """Tile equally sized HWC (or HW) arrays into one array, row-major, separated by ``gap`` pixels.

    Missing tiles (``None``) stay blank. NaN padding inside tiles becomes a checkerboard.
    """
    tiles = list(tiles)
    if not tiles:
        raise ValueError("mosaic needs at least one tile")
    first = next((t for t in tiles if t is not None), None)
    if first is None:
        raise ValueError("mosaic got only empty tiles")
    h, w = first.shape[:2]
    extra = first.shape[2:]
    n = len(tiles)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * h + (nrows - 1) * gap, ncols * w + (ncols - 1) * gap) + extra, gap_value, np.float32)
    for i, t in enumerate(tiles):
        if t is None:
            continue
        if t.shape[:2] != (h, w):
            raise ValueError(f"mosaic tiles must share one size: tile 0 is {(h, w)}, tile {i} is {t.shape[:2]}")
        r, c = divmod(i, ncols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = show_padded(t)
    return out


def _normalise_filter(w: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    lo, hi = float(np.min(w)), float(np.max(w))
    if hi - lo < eps:
        return np.full_like(w, 0.5, dtype=np.float32)
    return ((w - lo) / (hi - lo)).astype(np.float32)


def filter_grid(weights: np.ndarray, *, ncols: int | None = None, scale: str = "per_filter",
                dead: np.ndarray | None = None, title: str | None = None, fig: Figure | None = None) -> Figure:
    """First-layer filters as a grid of small images.

    ``weights``: (C_out, C_in, kh, kw) array (a conv weight). With 3 input channels each filter is
    shown in RGB; otherwise its first channel in grey. ``scale``: ``"per_filter"`` stretches each
    filter to [0, 1] (shape and colour of each filter visible; the usual choice in papers) or
    ``"global"`` uses one range for all (relative strength visible). ``dead``: optional (C_out,)
    bool mask (e.g. ``vizlearn.layer1_health(model).dead``); those filters are drawn flat grey with
    a red frame instead of their stretched numerical noise.
    """
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 4:
        raise ValueError(f"filter_grid expects conv weights (C_out, C_in, kh, kw), got shape {w.shape}")
    if scale not in ("per_filter", "global"):
        raise ValueError(f"scale must be 'per_filter' or 'global', got {scale!r}")
    tiles = w.transpose(0, 2, 3, 1) if w.shape[1] == 3 else w[:, 0]
    dead = np.zeros(len(w), bool) if dead is None else np.asarray(dead, bool)
    if dead.shape != (len(w),):
        raise ValueError(f"dead must be a ({len(w)},) bool mask, got shape {dead.shape}")
    if scale == "global":
        m = float(np.abs(w).max()) or 1.0
        tiles = [0.5 + 0.5 * t / m for t in tiles]
    else:
        tiles = [_normalise_filter(t) for t in tiles]
    tiles = [np.full_like(t, 0.5) if d else t for t, d in zip(tiles, dead)]
    n = len(tiles)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = fig or Figure(figsize=(ncols * 0.8, nrows * 0.8 + (0.4 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(tiles[i], cmap=None if tiles[i].ndim == 3 else "gray", interpolation="nearest", vmin=0, vmax=1)
        if dead[i]:
            for s in ax.spines.values():
                s.set_color("red")
                s.set_linewidth(2)
    if title:
        fig.suptitle(title)
    return fig


def feature_panel(projections, patches: np.ndarray, *, labels: Sequence[str] | None = None,
                  title: str | None = None, per_row: int | None = None, fig: Figure | None = None) -> Figure:
    """Zeiler & Fergus Fig. 2 style panel.

    ``patches``: (F, k, h, w, 3) array in [0, 1] (NaN = outside the image): for each of F filters,
    the image patches of its k strongest activations. ``projections``: an array of the same shape
    (their projections to pixel space), or a mapping ``{method name: array}`` to show several
    projection methods side by side. Each block is a sqrt(k) x sqrt(k) mosaic; per filter the
    projection block(s) come first, then the patches. ``labels``: one caption per filter.
    """
    blocks = dict(projections) if isinstance(projections, Mapping) else {"projections": projections}
    patches = np.asarray(patches)
    for name, arr in blocks.items():
        arr = np.asarray(arr)
        if arr.ndim != 5 or arr.shape[:2] != patches.shape[:2]:
            raise ValueError(f"{name} and patches must both be (F, k, h, w, 3); got {arr.shape} and {patches.shape}")
    n_filters, k = patches.shape[:2]
    side = math.ceil(math.sqrt(k))
    width = len(blocks) + 1
    per_row = per_row or (2 if width == 2 else 1)
    nrows = math.ceil(n_filters / per_row)
    fig = fig or Figure(figsize=(per_row * width * 2.2, nrows * 2.3 + (0.5 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, per_row * width, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for f in range(n_filters):
        r, c = divmod(f, per_row)
        name = labels[f] if labels is not None else f"filter {f}"
        for b, (method, arr) in enumerate(list(blocks.items()) + [("image patches", patches)]):
            ax = axes[r, c * width + b]
            ax.imshow(mosaic(list(np.asarray(arr)[f]), ncols=side), interpolation="nearest")
            ax.set_title(f"{name}: {method}" if b == 0 else method, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def activation_maps(image: np.ndarray, maps: Mapping[str, np.ndarray], *, n: int = 8,
                    fig: Figure | None = None) -> Figure:
    """One photo's activation maps: a row per layer, its ``n`` most active channels.

    ``maps``: ``{layer: (C, h, w) array}``. Channels are ranked by their spatial max; each map is
    drawn with its own colour scale (``viridis``), upsampled to the photo's size so that what
    responds where can be compared with the photo on the left.
    """
    if not maps:
        raise ValueError("activation_maps needs at least one layer's maps")
    rows = len(maps)
    fig = fig or Figure(figsize=(1.6 * (n + 1), 1.7 * rows), layout="constrained")
    axes = fig.subplots(rows, n + 1, squeeze=False)
    h, w = image.shape[:2]
    for r, (layer, m) in enumerate(maps.items()):
        m = np.asarray(m, dtype=np.float32)
        if m.ndim != 3:
            raise ValueError(f"maps[{layer!r}] must be (C, h, w), got {m.shape}")
        axes[r, 0].imshow(np.clip(image, 0, 1))
        axes[r, 0].set_ylabel(layer, fontsize=8)
        order = np.argsort(-m.reshape(len(m), -1).max(axis=1), kind="stable")[:n]
        for j, ch in enumerate(order):
            ax = axes[r, j + 1]
            ax.imshow(m[ch], cmap="viridis", extent=(0, w, h, 0), interpolation="nearest")
            ax.set_title(f"ch {ch}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        for j in range(len(order) + 1, n + 1):
            axes[r, j].axis("off")
    return fig


def predictions(images: Sequence[np.ndarray], preds: Sequence[Sequence[tuple[str, float]]], *,
                names: Sequence[str] | None = None, ncols: int = 4, fig: Figure | None = None) -> Figure:
    """Each photo above a horizontal bar chart of its top-k classes and probabilities."""
    if len(images) != len(preds):
        raise ValueError(f"got {len(images)} images but {len(preds)} prediction lists")
    n = len(images)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = fig or Figure(figsize=(3.2 * ncols, 4.2 * nrows), layout="constrained")
    sub = fig.subfigures(nrows, ncols, squeeze=False)
    for i in range(nrows * ncols):
        sf = sub.flat[i]
        if i >= n:
            continue
        ax_img, ax_bar = sf.subplots(2, 1, height_ratios=[3, 2])
        ax_img.imshow(np.clip(images[i], 0, 1))
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        if names is not None:
            ax_img.set_title(names[i], fontsize=9)
        labels = [lab for lab, _ in preds[i]][::-1]
        probs = [p for _, p in preds[i]][::-1]
        ax_bar.barh(range(len(probs)), probs, color="tab:blue")
        ax_bar.set_yticks(range(len(probs)), labels, fontsize=7)
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(axis="x", labelsize=7)
    return fig


def plot_sanity(result, *, image: int = 0) -> Figure:
    """Cascading-randomisation sanity check (:func:`vizlearn.sanity_check`): similarity vs step + projections.

    Top: mean SSIM and Spearman rank correlation (over the images, with min-max band) between the
    original projection and the projection after re-initialising the layers from the top down.
    Bottom: the projection of image ``image`` at every step (grey = 0), all cut to the box around
    the original projection's visible part (plus a margin), so that small projections of early
    layers are not lost in a grey square.
    """
    ssim = np.asarray(result.ssim, dtype=float)
    rho = np.asarray(result.spearman, dtype=float)
    projs = np.asarray(result.projections)
    steps = list(result.steps)
    n_steps = len(steps)
    if not 0 <= image < projs.shape[1]:
        raise ValueError(f"image must be in [0, {projs.shape[1]}), got {image}")
    fig = Figure(figsize=(max(6.0, 0.9 * n_steps), 5.2), layout="constrained")
    gs = fig.add_gridspec(2, n_steps, height_ratios=[2.2, 1.0])
    ax = fig.add_subplot(gs[0, :])
    xs = np.arange(n_steps)
    for vals, label, color in ((ssim, "SSIM", "tab:blue"), (rho, "Spearman rank corr. (|p|)", "tab:orange")):
        ax.plot(xs, vals.mean(1), "o-", color=color, label=label)
        if vals.shape[1] > 1:
            ax.fill_between(xs, vals.min(1), vals.max(1), color=color, alpha=0.15)
    ax.set_xticks(xs, [s.replace(" .. ", "\n.. ") for s in steps], rotation=35, ha="right", fontsize=7)
    ax.set_ylim(min(-0.1, float(np.nanmin(np.r_[ssim.ravel(), rho.ravel()])) - 0.05), 1.05)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_ylabel("similarity to original")
    ax.set_xlabel("re-initialised from the top down (cumulative)")
    ax.set_title(f"Sanity check (cascading randomisation): {result.method}, layer {result.layer}, "
                 f"channel {result.channel}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    dev = np.abs(projs[0, image] - 0.5)
    dev = dev.max(-1) if dev.ndim == 3 else dev
    rows, cols = np.nonzero(dev > 0.05)
    if len(rows):
        m = 8
        y0, y1 = max(rows.min() - m, 0), min(rows.max() + m + 1, dev.shape[0])
        x0, x1 = max(cols.min() - m, 0), min(cols.max() + m + 1, dev.shape[1])
    else:
        y0, y1, x0, x1 = 0, dev.shape[0], 0, dev.shape[1]
    for k in range(n_steps):
        a = fig.add_subplot(gs[1, k])
        img = projs[k, image][y0:y1, x0:x1]
        a.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        a.set_xticks([])
        a.set_yticks([])
        a.set_title(str(k), fontsize=7)
    return fig
