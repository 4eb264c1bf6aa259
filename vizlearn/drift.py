"""Measurements of what fine-tuning moved, stage by stage (used by :func:`vizlearn.finetune.finetune`).

* weights: relative change ``||W - W0|| / ||W0||`` split into angle and scale (``||W|| / ||W0||``),
  per stage and per parameter tensor; BN running-statistic drift;
* representations: linear CKA of each stage output against the reference on fixed probe sets,
  the overlap of each unit's top-9 probe images with its reference top-9;
* first-layer filters: per-filter cosine before/after; per-stage linear-probe accuracy;
* the units shown in the top-9 figure and their receptive-field boxes.

Numpy and torch only (no matplotlib). Stages are ``vizlearn.finetune.model_stages`` records
(``name``, ``modules``, ``output``); the last one is the head and has no measured output.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .layers import module_device
from .similarity import cka_from_grams

__all__ = ["relative_change", "flat", "sq_norm", "relative_distance", "stage_outputs", "rank_top_k", "StageMeasure", "measure_sets",
           "compare_to_reference", "stage_weight_change", "bn_drift", "param_change", "filter_cosine",
           "stage_probe_accuracy", "top9_units"]


# --------------------------------------------------------------------------- weights
def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one float64 CPU vector (empty: a zero-length vector)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def relative_change(now: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(||now - ref|| / ||ref||, angle in degrees, ||now|| / ||ref||); NaN if ref is zero."""
    n0 = float(ref.norm())
    if n0 == 0.0 or now.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    n1 = float(now.norm())
    r = float((now - ref).norm()) / n0
    cos = float(torch.dot(now, ref)) / (n0 * n1) if n1 > 0 else 0.0
    return r, math.degrees(math.acos(max(-1.0, min(1.0, cos)))), n1 / n0


def sq_norm(tensors: Sequence[torch.Tensor]) -> float:
    """Sum of squares of all entries, in float64."""
    return sum(float(torch.sum(t.double() ** 2)) for t in tensors)


def relative_distance(now: Sequence[torch.Tensor], base: Sequence[torch.Tensor], base_norm: float) -> float:
    """``||now - base|| / base_norm`` over paired tensors without concatenating them (the per-step
    drift); NaN when ``base_norm`` is 0."""
    with torch.no_grad():
        num = sum(float(torch.sum((a.detach() - b) ** 2, dtype=torch.float64)) for a, b in zip(now, base))
    return math.sqrt(num) / base_norm if base_norm > 0 else float("nan")


def stage_weight_change(params: Mapping[str, torch.Tensor], bases: Sequence[Mapping[str, torch.Tensor]]):
    """Per stage ``g`` (``bases[g]``: parameter name -> reference tensor): arrays (G,) of relative
    change, angle (degrees) and scale, over all parameters of the stage."""
    G = len(bases)
    wc, wa, ws = (np.full(G, np.nan) for _ in range(3))
    for g, base in enumerate(bases):
        names = list(base)
        wc[g], wa[g], ws[g] = relative_change(flat([params[n] for n in names]), flat([base[n] for n in names]))
    return wc, wa, ws


def bn_drift(buffers: Mapping[str, torch.Tensor], ref_buffers: Mapping[str, torch.Tensor],
             stage_buffers: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Relative change of the BN running means and variances of each stage; NaN where none."""
    G = len(stage_buffers)
    bm, bv = np.full(G, np.nan), np.full(G, np.nan)
    for g, names in enumerate(stage_buffers):
        mb = [n for n in names if n.endswith("running_mean")]
        vb = [n for n in names if n.endswith("running_var")]
        if mb:
            bm[g] = relative_change(flat([buffers[n] for n in mb]), flat([ref_buffers[n] for n in mb]))[0]
            bv[g] = relative_change(flat([buffers[n] for n in vb]), flat([ref_buffers[n] for n in vb]))[0]
    return bm, bv


def param_change(params: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], names: Sequence[str]):
    """(P,) relative change of each parameter tensor against ``base``."""
    return np.array([relative_change(flat([params[n]]), flat([base[n]]))[0] for n in names])


def filter_cosine(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(C,) cosine between each filter before and after; NaN for (near-)zero filters."""
    a64 = before.reshape(len(before), -1).astype(np.float64)
    b64 = after.reshape(len(after), -1).astype(np.float64)
    nb_, na_ = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    cos = np.sum(a64 * b64, axis=1) / np.maximum(nb_ * na_, 1e-300)
    cos[nb_ < 1e-3 * nb_.max()] = np.nan  # (near-)zero filters: direction undefined
    return cos


# --------------------------------------------------------------------------- representations
def stage_outputs(model, stages, x: torch.Tensor, *, batch_size: int, pool_only=False) -> dict[int, torch.Tensor]:
    """Run ``x`` through ``model`` in eval mode; outputs of every non-head stage (float32, CPU)."""
    from .capture import capture
    from .state import eval_mode

    names = [s.output for s in stages[:-1]]
    device = module_device(model)
    chunks: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(names))}
    with eval_mode(model), torch.no_grad():
        for b in range(0, len(x), batch_size):
            with capture(model, names) as acts:
                model(x[b:b + batch_size].to(device))
            for i, n in enumerate(names):
                a = acts[n].float().cpu()
                if pool_only and a.ndim == 4:
                    a = a.mean(dim=(2, 3))
                chunks[i].append(a)
    return {i: torch.cat(c) for i, c in chunks.items()}


def rank_top_k(smax: np.ndarray, smean: np.ndarray, k: int) -> np.ndarray:
    """(N, C) spatial max and mean per image and unit -> (C, k) image indices, best first.

    Images are ranked by spatial max (as :func:`vizlearn.topk.top_k`); ties -- frequent where
    ReLU6 saturates at 6 -- are broken by the spatial mean, then by the lower image index.
    ``top_k`` breaks ties by index alone, which would make every saturated unit pick the same
    first images before and after fine-tuning and inflate the top-9 overlap; it also needs a
    forward pass of its own, while these maps are already captured for CKA.
    """
    a, b = smax.astype(np.float64), smean.astype(np.float64)
    return np.stack([np.lexsort((-b[:, c], -a[:, c]))[:k] for c in range(a.shape[1])])


class StageMeasure(NamedTuple):
    gram: np.ndarray  # (N, N) centred Gram of the (flattened or pooled) stage output
    top: np.ndarray  # (C, k) top-k probe image indices per unit
    position: np.ndarray | None  # (N, C, 2) argmax (row, col) per image and unit; None for (N, C) outputs
    spread: np.ndarray  # (C,) std over images of each unit's spatial max
    map_hw: tuple[int, int]  # feature-map height, width ((1, 1) for (N, C) outputs)


def measure_sets(model, stages, sets: Mapping[str, torch.Tensor | None], *, batch_size: int, cka_pool: bool,
                 k: int = 9) -> dict[str, dict[int, StageMeasure] | None]:
    """Per probe set (None if absent or under 2 images): {stage index: :class:`StageMeasure`}."""
    out = {}
    for key, x in sets.items():
        if x is None or len(x) < 2:
            out[key] = None
            continue
        feats = stage_outputs(model, stages, x, batch_size=batch_size)
        res = {}
        for i, f in feats.items():
            if f.ndim == 4:
                flat_ = f.mean(dim=(2, 3)) if cka_pool else f.reshape(f.shape[0], -1)
                spatial = f.reshape(f.shape[0], f.shape[1], -1)
                smax, arg = spatial.max(dim=2)
                smean = spatial.mean(dim=2)
                pos = torch.stack([arg // f.shape[3], arg % f.shape[3]], dim=-1).numpy()
                hw = tuple(f.shape[2:4])
            else:
                flat_ = f.reshape(f.shape[0], -1)
                smax, smean, pos, hw = flat_, flat_, None, (1, 1)
            xd = flat_.double()
            xd = xd - xd.mean(dim=0, keepdim=True)
            gram = (xd @ xd.T).numpy()
            a = smax.double().numpy()
            top = rank_top_k(a, smean.double().numpy(), min(k, smax.shape[0]))
            res[i] = StageMeasure(gram, top, pos, a.std(axis=0), hw)
        out[key] = res
    return out


def compare_to_reference(meas, ref_meas, n_stages: int) -> dict[str, np.ndarray]:
    """``cka_<set>`` and ``ov_<set>`` (G,) arrays: linear CKA against the reference and the mean
    over units of ``|topk ∩ topk_ref| / k``; NaN where not measured (the head, absent sets)."""
    row = {}
    for key in ("target", "natural"):
        cka = np.full(n_stages, np.nan)
        ov = np.full(n_stages, np.nan)
        if meas.get(key) is not None:
            for g, m in meas[key].items():
                r = ref_meas[key][g]
                cka[g] = cka_from_grams(m.gram, r.gram)
                ov[g] = np.mean([len(set(a) & set(b)) / m.top.shape[1] for a, b in zip(m.top, r.top)])
        row["cka_" + key] = cka
        row["ov_" + key] = ov
    return row


def stage_probe_accuracy(model, stages, x_tr, y_tr, x_te, y_te, *, batch_size, seed) -> np.ndarray:
    """(G,) test accuracy of a logistic regression on the global-average-pooled stage outputs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ftr = stage_outputs(model, stages, x_tr, batch_size=batch_size, pool_only=True)
    fte = stage_outputs(model, stages, x_te, batch_size=batch_size, pool_only=True)
    acc = np.full(len(stages), np.nan)
    for i in ftr:
        a, b = ftr[i].reshape(len(x_tr), -1).double().numpy(), fte[i].reshape(len(x_te), -1).double().numpy()
        sc = StandardScaler().fit(a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(max_iter=300, C=1.0, random_state=seed).fit(sc.transform(a), y_tr)
        acc[i] = clf.score(sc.transform(b), y_te)
    return acc


# --------------------------------------------------------------------------- top-9 figure units
def _unit_boxes(model, layer: str, positions: np.ndarray, size: int) -> np.ndarray:
    """(k, 2) feature-map positions -> (k, 4) receptive-field boxes (clipped to the image)."""
    try:
        from .receptive_field import receptive_field, unit_box

        fld = receptive_field(model, layer, input_size=size)
        return np.array([unit_box(fld, (int(r), int(c)), (size, size)) for r, c in positions], dtype=np.int64)
    except Exception:  # noqa: BLE001 - receptive_field unavailable: show whole images
        return np.tile(np.array([0, 0, size, size], dtype=np.int64), (len(positions), 1))


def top9_units(model, stages, ref_meas: Mapping[int, StageMeasure], last_meas: Mapping[int, StageMeasure],
               size: int) -> dict:
    """One unit of the first and of the last backbone stage for the top-9 figure: the most selective
    unit under the reference network (largest spread of its spatial max over the probe images;
    constant units, e.g. zero filters after BN, are never chosen), preferring units whose top-9
    maxima lie inside the map (border maxima are padding effects). Returns lists ``stage``,
    ``channel``, ``before``/``after`` (k,) image indices and ``before_box``/``after_box`` (k, 4)."""
    u = {k: [] for k in ("stage", "channel", "before", "after", "before_box", "after_box")}
    for g in (0, len(stages) - 2):
        m0, m1 = ref_meas[g], last_meas[g]
        top0, pos0, act0, top1, pos1 = m0.top, m0.position, m0.spread, m1.top, m1.position
        if pos0 is None:
            continue
        fh, fw = m0.map_hw
        units = np.arange(top0.shape[0])[:, None]
        r_, c_ = pos0[top0, units, 0], pos0[top0, units, 1]
        inside = ((r_ > 0) & (r_ < fh - 1) & (c_ > 0) & (c_ < fw - 1)).mean(axis=1)
        score = np.where(inside >= 0.5, act0, act0 - np.inf) if (inside >= 0.5).any() else act0
        ch = int(np.argmax(score))
        u["stage"].append(stages[g].name)
        u["channel"].append(ch)
        u["before"].append(top0[ch])
        u["after"].append(top1[ch])
        u["before_box"].append(_unit_boxes(model, stages[g].output, pos0[top0[ch], ch], size))
        u["after_box"].append(_unit_boxes(model, stages[g].output, pos1[top1[ch], ch], size))
    return u
