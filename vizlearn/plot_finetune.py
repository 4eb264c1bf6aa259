"""Figures for fine-tuning drift: :class:`~vizlearn.finetune.FinetuneResult` in, Figure out.

Like :mod:`vizlearn.plot`: every function builds a :class:`matplotlib.figure.Figure` (no pyplot
state), single-panel functions accept ``ax=``, nothing is shown or saved. They read only the
numbers stored in the result, so a saved result (``FinetuneResult.load``) redraws them.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from .plot import mosaic

__all__ = [
    "drift_profile",
    "cka_profile",
    "first_layer_filters",
    "drift_over_steps",
    "topk_before_after",
    "bn_pitfall",
    "recipe_comparison",
    "stage_probe_accuracy",
]

_RECIPE_COLORS = {"lp-ft": "C0", "full": "C3", "discriminative": "C2", "linear-probe": "C7", "freeze-to": "C4"}


def _single(ax, figsize):
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot()
    return ax.figure, ax


def _as_map(results) -> dict:
    if isinstance(results, Mapping):
        return dict(results)
    return {results.config.get("recipe", "result"): results}


def _label(r) -> str:
    c = r.config
    s = c.get("recipe", "?")
    if c.get("bn") == "update":
        s += " (BN stats updating)"
    return s


def _color(name: str, i: int) -> str:
    if "BN" in name:
        return "C1"
    return _RECIPE_COLORS.get(name.split(" ")[0], f"C{(i + 4) % 10}")


def _stage_axis(ax, stages):
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels(stages, rotation=45, ha="right")
    ax.set_xlim(-0.5, len(stages) - 0.5)


def drift_profile(results, *, snapshot: int = -1, ax=None) -> Figure:
    """Relative weight change ``||W - W0|| / ||W0||`` per stage (stem -> head), log scale.

    ``results``: one result or ``{label: result}`` (one line each). The head (hollow marker) is
    measured from the unfreeze point -- it starts from scratch, so it is not comparable in kind.
    """
    fig, ax = _single(ax, (7.5, 4.2))
    for i, (name, r) in enumerate(_as_map(results).items()):
        y = 100 * r.weight_change[snapshot]
        col = _color(name, i)
        ax.plot(range(len(y) - 1), y[:-1], "o--" if "BN" in name else "o-", color=col,
                label=f"{name}  (acc {r.accuracy[snapshot]:.3f})")
        ax.plot([len(y) - 1], y[-1:], "o", mfc="white", color=col)
    stages = _as_map(results)[next(iter(_as_map(results)))].stages
    _stage_axis(ax, stages)
    ax.set_yscale("log")
    ax.set_ylabel("relative weight change (%), log scale")
    ax.set_title("How far each stage moved during fine-tuning\n(head, hollow: measured from the unfreeze point)")
    ax.grid(True, which="both", alpha=0.3)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    return fig


def cka_profile(result, *, ax=None) -> Figure:
    """Linear CKA between pretrained and fine-tuned stage outputs, target images vs natural
    photos; earlier epochs as thin lines."""
    fig, ax = _single(ax, (7.5, 4.2))
    G = len(result.stages) - 1  # no CKA for the new head
    x = np.arange(G)
    snaps = [i for i, s in enumerate(result.snapshots) if s != "pretrained"]
    for key, col, lab in (("cka_target", "C0", "target images (digits)" if result.config.get("dataset") == "digits"
                           else "target images"), ("cka_natural", "C1", "natural photos")):
        a = getattr(result, key)
        if np.all(np.isnan(a[-1, :G])):
            continue
        for i in snaps[:-1]:
            ax.plot(x, a[i, :G], "-", color=col, alpha=0.25, lw=1)
        ax.plot(x, a[-1, :G], "o-", color=col, label=f"{lab}, {result.snapshots[-1]}")
    _stage_axis(ax, result.stages[:G])
    ax.set_ylim(min(0.0, np.nanmin(np.r_[result.cka_target[-1, :G], result.cka_natural[-1, :G], 1.0])) - 0.02, 1.02)
    ax.set_ylabel("linear CKA (pretrained vs fine-tuned)")
    ax.set_title(f"Representation similarity per stage ({result.config.get('recipe')}); thin lines: earlier snapshots")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def _filter_tiles(w: np.ndarray, scale: np.ndarray, centre: float = 0.5) -> np.ndarray:
    """(C, 3, k, k) -> (C, k, k, 3) display tiles: 0.5 + w / (2 * scale) per filter."""
    t = centre + w / (2.0 * scale[:, None, None, None])
    return np.clip(np.transpose(t, (0, 2, 3, 1)), 0, 1)


def first_layer_filters(result, *, ncols: int = 8) -> Figure:
    """First conv filters: pretrained, fine-tuned (same per-filter colour scale), the difference
    amplified to full range, and 1 - cosine(before, after) per filter (zero filters masked)."""
    fb, fa = np.asarray(result.filters_before, np.float64), np.asarray(result.filters_after, np.float64)
    if fb.size == 0 or fb.shape[1] not in (1, 3):
        raise ValueError("the result holds no 1- or 3-channel first-layer filters to draw")
    if fb.shape[1] == 1:
        fb, fa = np.repeat(fb, 3, 1), np.repeat(fa, 3, 1)
    C = len(fb)
    scale = np.abs(fb).reshape(C, -1).max(axis=1)
    zero = ~np.isfinite(result.filter_cosine)
    scale[scale == 0] = 1.0
    d = fa - fb
    amp_scale = np.full(C, max(np.abs(d).max(), 1e-30))
    amp = float(np.median(scale) / amp_scale[0])
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    gs = fig.add_gridspec(2, 3, height_ratios=[1.25, 1])
    titles = ("pretrained", f"fine-tuned ({result.snapshots[-1]})",
              f"difference, amplified x{amp:.0f}\n(one scale for all filters; grey = 0)")
    for j, (tiles, title) in enumerate(((_filter_tiles(fb, scale), titles[0]), (_filter_tiles(fa, scale), titles[1]),
                                        (_filter_tiles(d, amp_scale), titles[2]))):
        ax = fig.add_subplot(gs[0, j])
        ax.imshow(mosaic(list(tiles), ncols=ncols), interpolation="nearest")
        k = fb.shape[-1]
        for i in np.flatnonzero(zero):
            r, q = divmod(int(i), ncols)
            ax.plot(q * (k + 1) + (k - 1) / 2, r * (k + 1) + (k - 1) / 2, "x", color="red", ms=6)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(gs[1, :])
    a, b = fb.reshape(C, -1), fa.reshape(C, -1)  # float64: 1 - cos resolves ~1e-15
    cos = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    one_minus = np.clip(1.0 - cos, 1e-12, None)
    ax.bar(np.arange(C)[~zero], one_minus[~zero], color="C0")
    ax.set_yscale("log")
    for i in np.flatnonzero(zero):
        ax.text(i, 0.03, "zero", rotation=90, ha="center", va="bottom", fontsize=7, color="red",
                transform=ax.get_xaxis_transform())
    ax.set_xlim(-0.7, C - 0.3)
    ax.set_xticks(range(0, C, 2 if C > 16 else 1))
    ax.set_xlabel("filter")
    ax.set_ylabel("1 - cosine(before, after)")
    r = result.param(result.first_conv + ".weight") if result.first_conv else float("nan")
    ax.set_title(f"per-filter change of direction; whole layer moved {100 * r:.2f}% "
                 f"(red x: all-zero filters, direction undefined)", fontsize=9)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    fig.suptitle(f"First layer ({result.first_conv}) before and after fine-tuning ({result.config.get('recipe')})")
    return fig


def _stage_colors(n):
    from matplotlib import colormaps

    cm = colormaps["viridis"]
    return [cm(i / max(n - 1, 1)) for i in range(n)]


def drift_over_steps(result) -> Figure:
    """Relative weight change per stage after every step (log scale) with validation accuracy;
    the linear probe (backbone frozen, only the head moves) and the unfreeze point are marked."""
    step, sd = np.asarray(result.step), np.asarray(result.step_drift)
    if len(step) == 0:
        raise ValueError("the result has no per-step drift (finetune(..., track_steps=True))")
    u = int(result.unfreeze_step)
    has_probe = "probe" in result.snapshots
    G = len(result.stages)
    cols = _stage_colors(G)
    phase, part = np.array(result.log_phase), np.array(result.log_part)
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    widths = [1, 3] if has_probe and u > 0 else [1]
    gs = fig.add_gridspec(1, len(widths), width_ratios=widths, wspace=0.02)
    panels = []
    if len(widths) == 2:
        panels.append(("probe", fig.add_subplot(gs[0, 0]), step <= u))
        panels.append(("finetune", fig.add_subplot(gs[0, 1]), step > u))
    else:
        panels.append(("finetune" if u >= 0 else "probe", fig.add_subplot(gs[0, 0]), np.ones(len(step), bool)))
    ymin = np.nanmin(np.where(sd > 0, sd, np.nan)) * 100
    ymax = np.nanmax(sd) * 100
    for pi, (name, ax, m) in enumerate(panels):
        for g in range(G):
            y = 100 * sd[m, g]
            ok = y > 0
            if ok.any():
                ax.plot(step[m][ok], y[ok], color="C3" if g == G - 1 else cols[g], lw=2.2 if g in (0, G - 2) else 1.2,
                        ls="--" if g == G - 1 else "-", label=result.stages[g] if pi == len(panels) - 1 else None)
        ax.set_yscale("log")
        ax.set_ylim(ymin / 1.5, ymax * 1.5)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("training step")
        ax2 = ax.twinx()
        v = (phase == "val") & (part == name)
        if v.any():
            steps_v = np.unique(result.log_step[v])
            acc = [np.average(result.log_accuracy[v & (result.log_step == s)],
                              weights=result.log_size[v & (result.log_step == s)]) for s in steps_v]
            if name == "finetune" and has_probe and u > 0 and "probe" in result.snapshots:
                steps_v = np.r_[u, steps_v]  # start from the probe's accuracy at the unfreeze point
                acc = [result.accuracy[result.snapshots.index("probe")], *acc]
            ax2.plot(steps_v, acc, "s-", color="black", ms=4, lw=1, label="test accuracy")
        ax2.set_ylim(0, 1.02)
        if pi == len(panels) - 1:
            ax2.set_ylabel("test accuracy (black squares)")
        else:
            ax2.set_yticklabels([])
        if pi == 0:
            ax.set_ylabel("relative weight change (%), log")
        else:
            ax.tick_params(labelleft=False)
        if name == "probe":
            ax.set_title("linear probe: backbone frozen,\nonly the head (dashed) moves", fontsize=9)
        else:
            ax.axvline(u, color="red", lw=1.5)
            ax.set_title(f"fine-tuning ({result.config.get('recipe')}): all trainable stages; "
                         f"red line = unfreeze (step {u}); head from there", fontsize=9)
    fig.legend(*panels[-1][1].get_legend_handles_labels(), loc="outside right center", fontsize=8,
               title="stage", title_fontsize=8)
    return fig


def _context_crop(img: np.ndarray, box, min_side: int) -> tuple[np.ndarray, tuple]:
    """Crop around ``box`` (y0, x0, y1, x1) at least ``min_side`` wide; box in crop coordinates."""
    H, W = img.shape[:2]
    y0, x0, y1, x1 = (int(v) for v in box)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    side = max(min_side, y1 - y0, x1 - x0)
    side = min(side, H, W)
    a = int(round(min(max(cy - side / 2, 0), H - side)))
    b = int(round(min(max(cx - side / 2, 0), W - side)))
    return img[a:a + side, b:b + side], (y0 - a, x0 - b, y1 - a, x1 - b)


def topk_before_after(result, *, context: int = 24) -> Figure:
    """For each unit stored in the result (a layer-1 unit and a late unit): its top-9 target
    images before and after fine-tuning, the receptive field outlined (small fields are shown
    inside a ``context`` px window)."""
    from matplotlib.patches import Rectangle

    U = len(result.unit_stage)
    if U == 0:
        raise ValueError("the result stores no units for the top-9 figure")
    imgs = np.asarray(result.probe_images, dtype=np.float32) / 255.0
    k = result.unit_before.shape[1]
    fig = Figure(figsize=(12, 1.45 * 2 * U + 0.6), layout="constrained")
    sub = fig.subfigures(U, 1)
    sub = np.atleast_1d(sub)
    for u in range(U):
        g = result.stage_index(result.unit_stage[u])
        before, after = result.unit_before[u], result.unit_after[u]
        ov = len(set(before.tolist()) & set(after.tolist()))
        mean_ov = result.topk_overlap_target[-1, g]
        sub[u].suptitle(f"{result.unit_stage[u]}, unit {int(result.unit_channel[u])}: {ov}/{k} of the top-{k} "
                        f"images kept (stage mean {mean_ov * k:.1f}/{k})", fontsize=10)
        axs = sub[u].subplots(2, k)
        for row, (idx, boxes, lab) in enumerate(((before, result.unit_before_box[u], "pretrained"),
                                                 (after, result.unit_after_box[u], "fine-tuned"))):
            for j in range(k):
                ax = axs[row, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if idx[j] < 0:
                    continue
                crop, (y0, x0, y1, x1) = _context_crop(imgs[idx[j]], boxes[j], context)
                ax.imshow(crop, interpolation="nearest")
                if (y1 - y0) < crop.shape[0] or (x1 - x0) < crop.shape[1]:
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.2))
                kept = idx[j] in (after if row == 0 else before)
                for s in ax.spines.values():
                    s.set_edgecolor("C2" if kept else "0.7")
                    s.set_linewidth(2.5 if kept else 0.5)
                if j == 0:
                    ax.set_ylabel(lab, fontsize=9)
    fig.suptitle("Top-9 target images of one unit before vs after fine-tuning (green frame: in both top-9s; "
                 "red box: the unit's receptive field)", fontsize=10)
    return fig


def bn_pitfall(frozen, updating) -> Figure:
    """Accuracy per snapshot with BatchNorm statistics frozen vs updating, and the BN running-
    statistics drift per stage of the updating run (the frozen run's is exactly 0)."""
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    for r, col, lab in ((frozen, "C0", "BN statistics frozen (eval-mode BN)"),
                        (updating, "C3", "BN statistics updating (train-mode BN)")):
        snaps = [i for i, s in enumerate(r.snapshots) if s != "pretrained"]
        ax.plot([r.snapshots[i] for i in snaps], r.accuracy[snaps], "o-", color=col, label=lab)
        ax.annotate(f"{r.accuracy[-1]:.3f}", (len(snaps) - 1, r.accuracy[-1]), textcoords="offset points",
                    xytext=(6, -3), fontsize=9, color=col)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Same recipe ({frozen.config.get('recipe')}), same seed", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    G = len(updating.stages) - 1
    x = np.arange(G)
    w = 0.38
    bx.bar(x - w / 2, 100 * updating.bn_mean_drift[-1, :G], w, label="running mean", color="C3")
    bx.bar(x + w / 2, 100 * updating.bn_var_drift[-1, :G], w, label="running variance", color="C1")
    if np.nanmax(np.r_[updating.bn_mean_drift[-1, :G], updating.bn_var_drift[-1, :G], 0.0]) > 0:
        bx.set_yscale("log")
    _stage_axis(bx, updating.stages[:G])
    bx.set_ylabel("relative change of BN statistics (%)")
    bx.set_title("BN running statistics drift when updating (frozen: exactly 0)", fontsize=10)
    bx.grid(True, which="both", axis="y", alpha=0.3)
    bx.legend(fontsize=8)
    return fig


def recipe_comparison(results: Mapping[str, object]) -> Figure:
    """Small multiples, one column per recipe: weight-change profile (log, shared axis) and CKA
    profile (target and natural photos), with the test accuracy in the title."""
    results = dict(results)
    n = len(results)
    fig = Figure(figsize=(3.6 * n + 0.6, 6.2), layout="constrained")
    axs = fig.subplots(2, n, sharey="row", squeeze=False)
    lo = min(np.nanmin(np.where(r.weight_change[-1] > 0, r.weight_change[-1], np.nan)) for r in results.values())
    hi = max(np.nanmax(r.weight_change[-1]) for r in results.values())
    for j, (name, r) in enumerate(results.items()):
        G = len(r.stages)
        a, b = axs[0, j], axs[1, j]
        col = _color(name, j)
        y = 100 * r.weight_change[-1]
        a.plot(range(G - 1), y[:-1], "o-", color=col)
        a.plot([G - 1], y[-1:], "o", mfc="white", color=col)
        a.set_yscale("log")
        a.set_ylim(100 * lo / 2, 100 * hi * 2)
        a.set_title(f"{name}\ntest accuracy {r.accuracy[-1]:.3f}", fontsize=10)
        a.grid(True, which="major", alpha=0.3)
        _stage_axis(a, r.stages)
        a.tick_params(axis="x", labelsize=7)
        b.plot(range(G - 1), r.cka_target[-1, :-1], "o-", color="C0", label="target")
        if not np.all(np.isnan(r.cka_natural[-1, :-1])):
            b.plot(range(G - 1), r.cka_natural[-1, :-1], "s--", color="C1", label="natural photos", ms=4)
        b.set_ylim(0, 1.03)
        b.grid(True, alpha=0.3)
        _stage_axis(b, r.stages[:-1])
        b.tick_params(axis="x", labelsize=7)
        lrs = r.config.get("stage_lr") or {}
        if lrs:
            v = [x for x in lrs.values() if x > 0]
            a.text(0.02, 0.97, f"lr {min(v):.0e}..{max(v):.0e}" if min(v) != max(v) else f"lr {v[0]:.0e}",
                   transform=a.transAxes, va="top", fontsize=8)
        if j == 0:
            a.set_ylabel("relative weight change (%)")
            b.set_ylabel("linear CKA vs pretrained")
            b.legend(fontsize=8, loc="lower left")
    fig.suptitle("Recipes compared (same data, seed and epochs): how much each stage moved, and how similar "
                 "its representation stayed", fontsize=10)
    return fig


def stage_probe_accuracy(result, *, ax=None) -> Figure:
    """Per-stage linear-probe (logistic regression on global-average-pooled stage outputs) test
    accuracy, pretrained vs fine-tuned (Zeiler & Fergus 2014, Table 7 style)."""
    fig, ax = _single(ax, (7.5, 4.2))
    G = len(result.stages) - 1
    x = np.arange(G)
    w = 0.38
    ax.bar(x - w / 2, result.stage_probe_before[:G], w, label="pretrained (ImageNet)", color="0.6")
    ax.bar(x + w / 2, result.stage_probe_after[:G], w, label=f"fine-tuned ({result.config.get('recipe')})", color="C0")
    _stage_axis(ax, result.stages[:G])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("test accuracy of a linear probe")
    ax.set_title("What a linear classifier can read from each stage (GAP features, logistic regression)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig
