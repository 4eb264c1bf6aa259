"""Figures for the Zeiler & Fergus experiments: occlusion, invariance, evolution, correspondence, layer 1.

Every function takes results (numpy inside), builds a ``matplotlib.figure.Figure`` (no pyplot),
and returns it; nothing is saved or shown here.
"""
from __future__ import annotations

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ._display import signed_display

__all__ = ["plot_occlusion", "plot_invariance", "plot_evolution", "plot_evolution_settle",
           "plot_correspondence", "plot_layer1_health", "signed_to_display"]

_XLABEL = {"translate": "vertical shift (pixels, + = down)", "scale": "scale factor",
           "rotate": "rotation (degrees)"}


def signed_to_display(p: np.ndarray, *, clip: float | None = None) -> np.ndarray:
    """Signed (H, W[, C]) array -> [0, 1] with 0 at mid-grey, largest |value| at 0 or 1
    (``clip``: the given percentile of |value| maps to 0 / 1 instead, values beyond saturate)."""
    return signed_display(p, percentile=100.0 if clip is None else clip)


def _short(name: str, n: int = 20) -> str:
    name = str(name).split(",")[0]
    return name if len(name) <= n else name[:n - 1] + "…"


def _off(ax):
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------------------------
# occlusion (Fig. 7)
# ----------------------------------------------------------------------------------------------

def plot_occlusion(results, *, max_labels: int = 6) -> Figure:
    """The paper's five-panel row per image: (a) image with an example occluder, (b) total activity
    of the strongest feature map of the chosen layer as a function of occluder position, (c) that
    map's deconvnet projection, (d) P(target class), (e) most probable label (legend: the labels
    covering the largest areas)."""
    if not isinstance(results, (list, tuple)):
        results = [results]
    has_act = any(r.activity is not None for r in results)
    ncol = 5 if has_act else 3
    fig = Figure(figsize=(3.3 * ncol, 3.9 * len(results)))
    top = 1 - 0.75 / (3.9 * len(results))
    gs = fig.add_gridspec(len(results), ncol, left=0.02, right=0.98, top=top, bottom=0.1,
                          wspace=0.28, hspace=0.55)
    palette = list(mcolors.TABLEAU_COLORS.values())
    for i, r in enumerate(results):
        h, w = r.prob.shape
        axes = [fig.add_subplot(gs[i, j]) for j in range(ncol)]
        for ax in axes:
            _off(ax)
        # (a) image + example occluder at the position where P(target) drops most
        ax = axes[0]
        ax.imshow(r.image, interpolation="bilinear")
        iy, ix = np.unravel_index(np.nanargmin(r.window_prob), r.window_prob.shape)
        y0, x0 = int(r.rows[iy]), int(r.cols[ix])
        fillc = np.clip(np.broadcast_to(np.asarray(r.fill, float), (3,)), 0, 1)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), r.size, r.size, facecolor=fillc, edgecolor="white", lw=1))
        ax.set_title(f"(a) {r.name or 'image'}\n{_short(r.name_of(r.target), 24)}: p = {r.base_prob:.2f}",
                     fontsize=9)
        ax.set_xlabel(f"occluder {r.size}px, stride {r.stride}px", fontsize=8)
        j = 1
        if has_act:
            ax = axes[1]
            if r.activity is not None:
                im = ax.imshow(r.activity, cmap="jet")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
                ax.set_title(f"(b) total activation of\n{r.layer} map {r.channel} (strongest)", fontsize=9)
                ax.set_xlabel("as a function of occluder position", fontsize=8)
                ax = axes[2]
                if r.projection is not None:
                    ax.imshow(signed_to_display(r.projection, clip=99.5), cmap="gray")
                    ax.set_title(f"(c) deconvnet projection of\nmap {r.channel} at {tuple(r.position)}",
                                 fontsize=9)
                    ax.set_xlabel("contrast: 99.5th percentile of |value|", fontsize=8)
                else:
                    ax.text(0.5, 0.5, "no projection", ha="center", va="center", transform=ax.transAxes)
            j = 3
        # (d) P(target)
        ax = axes[j]
        im = ax.imshow(r.prob, cmap="jet", vmin=0, vmax=max(float(np.nanmax(r.prob)), 1e-6))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
        ax.set_title(f"({'d' if has_act else 'b'}) P({_short(r.name_of(r.target), 18)})\n"
                     "with the occluder here", fontsize=9)
        # (e) most probable label
        ax = axes[j + 1]
        lab = r.label
        vals, counts = np.unique(lab[lab >= 0], return_counts=True)
        order = vals[np.argsort(-counts, kind="stable")]
        shown = list(order[:max_labels])
        if r.target in order and r.target not in shown:
            shown[-1] = r.target
        rgb = np.full(lab.shape + (3,), 0.8)
        handles = []
        for k, v in enumerate(shown):
            col = mcolors.to_rgb(palette[k % len(palette)])
            rgb[lab == v] = col
            share = (lab == v).mean()
            handles.append(Patch(color=col, label=f"{_short(r.name_of(int(v)))} ({share:.0%})"))
        if len(order) > len(shown):
            handles.append(Patch(color=(0.8, 0.8, 0.8), label=f"{len(order) - len(shown)} other labels"))
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"({'e' if has_act else 'c'}) most probable label", fontsize=9)
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7,
                  frameon=False, ncol=1, handlelength=1.0)
    fig.suptitle("Occlusion sensitivity (Zeiler & Fergus Fig. 7): a grey square slides over the image; "
                 "each map pixel = mean over the occluder positions covering it", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
# invariance (Fig. 5)
# ----------------------------------------------------------------------------------------------

def plot_invariance(res) -> Figure:
    """Rows: transforms; columns: relative feature distance per layer, then P(original top-1 class).
    Thin coloured lines: one per image; thick black: the mean."""
    nt, nl = len(res.transforms), len(res.layers)
    fig = Figure(figsize=(3.4 * (nl + 1), 2.7 * nt + 0.8))
    gs = fig.add_gridspec(nt, nl + 1, left=0.07, right=0.98, top=0.9, bottom=0.12, wspace=0.3, hspace=0.55)
    palette = list(mcolors.TABLEAU_COLORS.values())
    lines = []
    for ti, t in enumerate(res.transforms):
        x = res.steps[t]
        for col in range(nl + 1):
            ax = fig.add_subplot(gs[ti, col])
            y = res.distance[t][:, :, col] if col < nl else res.prob[t]
            for n in range(y.shape[1]):
                (ln,) = ax.plot(x, y[:, n], color=palette[n % len(palette)], lw=1, alpha=0.8)
                if ti == 0 and col == 0:
                    lines.append(ln)
            ax.plot(x, np.nanmean(y, 1), color="k", lw=2.2)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
            ax.set_xlabel(_XLABEL[t], fontsize=8)
            if col < nl:
                ax.set_ylim(bottom=0)
                if ti == 0:
                    ax.set_title(f"layer {res.layers[col]}:\n||f(Tx) − f(x)|| / ||f(x)||", fontsize=9)
            else:
                ax.set_ylim(0, 1.02)
                if ti == 0:
                    ax.set_title("P(original top-1 class)", fontsize=9)
            if col == 0:
                ax.set_ylabel(t, fontsize=10, fontweight="bold")
    labels = []
    for n, name in enumerate(res.names):
        cls = _short(res.class_names[res.label[n]], 16) if res.class_names else f"class {res.label[n]}"
        labels.append(f"{name} ({cls})")
    from matplotlib.lines import Line2D

    fig.legend(lines + [Line2D([], [], color="k", lw=2.2)], labels + ["mean"], loc="lower center",
               ncol=min(len(labels) + 1, 6), fontsize=8, frameon=False)
    fig.suptitle("Invariance (Zeiler & Fergus Fig. 5): feature change and class probability "
                 "under vertical translation, scaling and rotation", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
# feature evolution (Fig. 4)
# ----------------------------------------------------------------------------------------------

def plot_evolution(res, *, crop: bool = True, max_units: int | None = None, note: str = "") -> Figure:
    """One row per tracked unit, one column per recorded epoch: the deconvnet projection of the
    unit's strongest activation over the probe set (cropped to its receptive field)."""
    e = len(res.epochs)
    units = list(range(len(res.unit_layer)))[:max_units]
    height = 1.05 * len(units) + 1.2
    fig = Figure(figsize=(1.05 * e + 1.4, height))
    gs = fig.add_gridspec(len(units), e, left=0.14, right=0.99, top=1 - 0.95 / height,
                          bottom=0.01, wspace=0.06, hspace=0.08)
    for row, u in enumerate(units):
        for col in range(e):
            ax = fig.add_subplot(gs[row, col])
            _off(ax)
            p = np.moveaxis(res.projection[col, u], 0, -1)
            if crop:
                y0, x0, y1, x1 = res.box[col, u]
                p = p[y0:y1, x0:x1]
            ax.imshow(signed_to_display(p), cmap="gray", interpolation="nearest")
            if row == 0:
                ax.set_title(f"epoch {res.epochs[col]}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{res.unit_layer[u]}\nunit {res.unit_channel[u]}", fontsize=7,
                              rotation=0, ha="right", va="center")
    fig.suptitle("Feature evolution (Zeiler & Fergus Fig. 4): per unit, its strongest activation over the fixed "
                 "probe set, projected by deconvnet" + ("\n" + note if note else "")
                 + ("\n" if note else "\n") + "each patch cropped to the unit's receptive field; grey = 0",
                 fontsize=8)
    return fig


def plot_evolution_settle(res, *, ax=None) -> Figure:
    """Per layer, distance to the final state vs epoch: 1 - CKA(features) (solid) and the remaining
    share of the weight path (dashed). Lower layers reaching 0 earlier = settling first."""
    if ax is None:
        fig = Figure(figsize=(6.4, 3.8))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    c = res.cka()
    x = np.maximum(res.epochs[:-1], 0.5)  # the last epoch is the reference (distance 0)
    palette = list(mcolors.TABLEAU_COLORS.values())
    for li, ly in enumerate(res.layers):
        col = palette[li % len(palette)]
        ax.plot(x, np.maximum(1 - c[li, :-1, -1], 1e-7), "-o", color=col, ms=3, label=f"{ly}: 1 − CKA(features)")
        if res.weight_change is not None:
            ax.plot(x, res.weight_change[:-1, li], "--", color=col, lw=1,
                    label=f"{res.weight_layer[li] or ly}: weights, share of path left")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([str(int(v)) for v in res.epochs[:-1]], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel(f"epoch (0 = initialisation; reference = epoch {int(res.epochs[-1])})")
    ax.set_ylabel("distance to the final epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Which layers settle first? (0 = identical to the end of training)", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------
# correspondence (Table 1)
# ----------------------------------------------------------------------------------------------

def plot_correspondence(res, *, images: np.ndarray | None = None, note: str = "") -> Figure:
    """Top: the images with the masked part boxes (if ``images`` given). Bottom: Delta per layer for each
    part (bars) and for random boxes of the same size (hatched, mean +- std over draws); lower = more
    consistent."""
    parts, layers = res.parts, res.layers
    palette = list(mcolors.TABLEAU_COLORS.values())
    n_img = 0 if images is None else len(images)
    fig = Figure(figsize=(max(8.0, 2.0 * n_img), 6.2 if n_img else 3.8))
    if n_img:
        gs = fig.add_gridspec(2, n_img, height_ratios=[1, 1.5], left=0.08, right=0.98, top=0.9, bottom=0.1,
                              hspace=0.45, wspace=0.08)
        for i in range(n_img):
            ax = fig.add_subplot(gs[0, i])
            _off(ax)
            ax.imshow(images[i])
            for p, part in enumerate(parts):
                y0, x0, y1, x1 = res.boxes[part][i]
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       edgecolor=palette[p % len(palette)], lw=1.6))
            ax.set_title(res.names[i], fontsize=7)
        ax = fig.add_subplot(gs[1, :])
    else:
        ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / (2 * len(parts))
    xs = np.arange(len(layers))
    for p, part in enumerate(parts):
        col = palette[p % len(palette)]
        off = (2 * p - len(parts) + 0.5) * width
        ax.bar(xs + off, res.delta[p], width, color=col, label=f"{part}")
        r = res.delta_random[p]
        ax.bar(xs + off + width, r.mean(0), width, yerr=r.std(0), color=col, alpha=0.35, hatch="//",
               edgecolor=col, capsize=2, label=f"random box, size of {part}")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"layer {ly}" for ly in layers], fontsize=9)
    ax.set_ylabel("Δ (mean normalised Hamming\ndistance of sign changes)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, 1.08 * max(float(np.max(res.delta)), float(np.max(res.delta_random.mean(1) + res.delta_random.std(1)))))
    ax.legend(fontsize=7, ncol=len(parts), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if note:
        fig.text(0.5, 0.01, note, ha="center", fontsize=8, style="italic")
    fig.suptitle("Correspondence (Zeiler & Fergus Table 1): masking the same part changes features "
                 "consistently if Δ(part) < Δ(random)", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
# layer-1 health (Fig. 6)
# ----------------------------------------------------------------------------------------------

def _filter_image(w: np.ndarray) -> np.ndarray:
    """(C, kh, kw) -> displayable (kh, kw, 3|) normalised on its own, zero at grey."""
    img = np.moveaxis(w, 0, -1)
    if img.shape[2] not in (1, 3):
        img = img.mean(2, keepdims=True)
    return signed_to_display(img)


def plot_layer1_health(h, *, title: str | None = None) -> Figure:
    """Filters (each scaled on its own; red frame = dead, orange = dominant), RMS per filter with the
    thresholds, and the share of spectral energy in low / mid / high frequencies per filter."""
    f = len(h.rms)
    cols = min(f, 16)
    rows = int(np.ceil(f / cols))
    fig = Figure(figsize=(max(9.0, 0.62 * cols + 1.5), 1.0 + 0.7 * rows + 5.2))
    gs = fig.add_gridspec(rows + 2, cols, height_ratios=[1] * rows + [3.0, 3.0], left=0.08, right=0.98,
                          top=0.92, bottom=0.07, hspace=0.5, wspace=0.15)
    for i in range(f):
        ax = fig.add_subplot(gs[i // cols, i % cols])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(_filter_image(h.weight[i]) if not h.dead[i] else np.full(h.weight.shape[2:], 0.5),
                  cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        color = "red" if h.dead[i] else ("darkorange" if h.dominant[i] else "0.6")
        for s in ax.spines.values():
            s.set_edgecolor(color)
            s.set_linewidth(2.5 if color != "0.6" else 0.8)
        ax.set_title(str(i), fontsize=6, pad=1, color=color if color != "0.6" else "k")
    idx = np.arange(f)
    ax = fig.add_subplot(gs[rows, :])
    colors = ["red" if d else ("darkorange" if m else "tab:blue") for d, m in zip(h.dead, h.dominant)]
    ax.bar(idx, h.rms, color=colors)
    ax.axhline(h.median_rms, color="k", lw=1, label=f"median {h.median_rms:.3g}")
    ax.axhline(h.dominant_ratio * h.median_rms, color="darkorange", ls="--", lw=1,
               label=f"dominant ≥ {h.dominant_ratio:g}× median")
    ax.axhline(h.dead_ratio * h.median_rms, color="red", ls=":", lw=1,
               label=f"dead ≤ {h.dead_ratio:g}× median")
    for i in np.flatnonzero(h.dead):
        ax.text(i, h.median_rms * 0.08, "dead", rotation=90, ha="center", va="bottom", fontsize=7, color="red")
    ax.set_xlim(-0.6, f - 0.4)
    ax.set_xticks(idx)
    ax.tick_params(labelsize=6)
    ax.set_ylabel("filter RMS", fontsize=9)
    ax.set_title("filter RMS (colour: red = dead, orange = dominant)", fontsize=8, loc="left")
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False)
    ax = fig.add_subplot(gs[rows + 1, :])
    bottom = np.zeros(f)
    for b, (name, col) in enumerate(zip(("low", "mid", "high"), ("tab:green", "tab:olive", "tab:purple"))):
        share = np.where(h.dead, 0.0, np.nan_to_num(h.bands[:, b]))
        ax.bar(idx, share, bottom=bottom, color=col, label=f"{name} frequencies")
        bottom += share
    ax.set_xlim(-0.6, f - 0.4)
    ax.set_ylim(0, 1)
    ax.set_xticks(idx)
    ax.tick_params(labelsize=6)
    for i in np.flatnonzero(h.dead):
        ax.text(i, 0.5, "dead", rotation=90, ha="center", va="center", fontsize=7, color="red")
    ax.set_xlabel("filter index", fontsize=8)
    ax.set_ylabel("share of spectral energy", fontsize=9)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False)
    ax.set_title("frequency content (|FFT|² of the zero-padded filter; bands: < 1/3, 1/3–2/3, ≥ 2/3 of Nyquist)",
                 fontsize=8, loc="left")
    nd, nm = int(h.dead.sum()), int(h.dominant.sum())
    fig.suptitle(f"Layer-1 health (Zeiler & Fergus Fig. 6){': ' + title if title else ''} — {h.layer or 'first conv'}"
                 f", {f} filters: {nd} dead, {nm} dominant\n(filters below: each scaled on its own, grey = 0; "
                 "red frame = dead, orange = dominant)", fontsize=10)
    return fig
