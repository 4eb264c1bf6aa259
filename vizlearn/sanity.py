"""Sanity check for projections: cascading randomisation (Adebayo et al. 2018).

A projection that explains what the *trained* network computes must change when the trained
weights are replaced by random ones. :func:`sanity_check` re-initialises the layers of a
**deep copy** of the model (the caller's model is never touched) from the top down: step 0 is
the original model, step 1 re-initialises the target layer (or the nearest layer with
parameters below it), step 2 additionally the next one down, and so on to the first layer
(cumulative, "cascading"). At each step it projects the same channel of the same images and
compares the projection with the original one by

* **SSIM** (``skimage.metrics.structural_similarity``) of the per-pixel magnitude maps
  ``sum_c |p_c|``, each scaled to [0, 1] by its maximum (``data_range=1``);
* **Spearman rank correlation** (``scipy.stats.spearmanr``) of the same magnitude maps
  (absolute values, as in the paper); 0 where a map is constant (e.g. all zero).

Layers = modules with their own parameters (conv, linear, BatchNorm, PReLU, ...) that run before
the target layer's output is computed, in execution order. Re-initialisation calls the module's
``reset_parameters()`` (BatchNorm: weight 1, bias 0 and running statistics reset) under a forked,
seeded RNG (global RNG state untouched); modules without it get their parameters randomly
permuted. With more layers than ``max_steps``, layers are grouped by block: the finest grouping
by module-name prefix (``blocks.4.2.*``) that gives at most ``max_steps`` steps (else equal
consecutive splits). At every step the projected unit is the channel's spatial argmax in the (randomised)
model, i.e. the picture vizlearn would show for that channel.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .capture import run_to_layer
from .layers import resolve_layer, unwrap_model
from .projection import METHODS, display_projection, project
from .state import eval_mode

__all__ = ["SanityResult", "sanity_check"]


@dataclass(frozen=True)
class SanityResult:
    """Result of :func:`sanity_check` (S = number of randomisation steps, N images)."""

    layer: str
    channel: int
    method: str
    steps: tuple  # (S+1,) str: "original", then the layer(s) re-initialised at each step (cumulative)
    ssim: np.ndarray  # (S+1, N) float64, SSIM of the magnitude maps vs step 0
    spearman: np.ndarray  # (S+1, N) float64, Spearman rank correlation of |projection| vs step 0
    projections: np.ndarray  # (S+1, N, H, W, 3) or (S+1, N, H, W) float32 display images in [0, 1]

    def save(self, path) -> Path:
        """Write ``path.npz`` (arrays) and ``path.json`` (metadata); returns the npz path."""
        path = Path(path).with_suffix(".npz")
        np.savez_compressed(path, ssim=self.ssim, spearman=self.spearman, projections=self.projections)
        meta = {"layer": self.layer, "channel": self.channel, "method": self.method, "steps": list(self.steps),
                "mean_ssim": self.ssim.mean(1).tolist(), "mean_spearman": self.spearman.mean(1).tolist()}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "SanityResult":
        path = Path(path).with_suffix(".npz")
        meta = json.loads(path.with_suffix(".json").read_text())
        with np.load(path) as z:
            return cls(meta["layer"], int(meta["channel"]), meta["method"], tuple(meta["steps"]),
                       z["ssim"], z["spearman"], z["projections"])


def _layers_below(module: nn.Module, x1: torch.Tensor, layer: str) -> list[str]:
    """Names of modules with own parameters whose forward finished before ``layer``'s output, in order."""
    names = {id(m): n for n, m in module.named_modules()}
    order: list[str] = []
    handles = []

    def hook(m, inp, out):
        n = names[id(m)]
        if n not in order:
            order.append(n)

    for n, m in module.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(module):
            run_to_layer(module, x1, layer)
    finally:
        for h in handles:
            h.remove()
    return order


def _group(top_down: list[str], max_steps: int) -> tuple[list[list[str]], list[str]]:
    """Steps of the cascade: the finest grouping by module-name prefix (blocks) with <= max_steps steps.

    Depth d groups consecutive layers sharing the first d name components (``blocks.4.2.*``); the
    deepest d that gives at most ``max_steps`` groups wins. Otherwise: equal consecutive splits.
    """
    best = None
    for d in range(1, max(len(n.split(".")) for n in top_down) + 1):
        groups: list[tuple[str, list[str]]] = []
        for name in top_down:
            key = ".".join(name.split(".")[:d])
            if groups and groups[-1][0] == key:
                groups[-1][1].append(name)
            else:
                groups.append((key, [name]))
        if len(groups) <= max_steps:
            best = groups
        else:
            break
    if best is not None:
        return [g for _, g in best], [k if g == [k] else f"{k}.*" for k, g in best]
    split = [list(g) for g in np.array_split(np.array(top_down, dtype=object), max_steps)]
    return split, [g[0] if len(g) == 1 else f"{g[0]} .. {g[-1]}" for g in split]


def _reinit(m: nn.Module, seed: int):
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        else:
            for p in m.parameters(recurse=False):
                p.copy_(p.flatten()[torch.randperm(p.numel())].view_as(p))


def _magnitude(p: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) sum of |p| over channels, scaled to [0, 1]."""
    m = np.abs(p).sum(0)
    top = m.max()
    return m / top if top > 0 else m


def _similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    ma, mb = _magnitude(a), _magnitude(b)
    win = min(7, *ma.shape)
    win = win if win % 2 == 1 else win - 1
    s = float(structural_similarity(ma, mb, data_range=1.0, win_size=win))
    if np.ptp(ma) == 0 or np.ptp(mb) == 0:
        r = 1.0 if np.array_equal(ma, mb) else 0.0
    else:
        r = float(spearmanr(np.abs(a).sum(0).ravel(), np.abs(b).sum(0).ravel()).statistic)
    return s, r


def sanity_check(model, images, layer: str, *, channel: int | None = None, method: str = "deconvnet",
                 seed: int = 0, max_steps: int = 16, select=None) -> SanityResult:
    """Cascading randomisation of the layers below ``layer`` (see the module docstring).

    Args:
        model: ``nn.Module`` or ``LoadedModel`` (deep-copied; the original is never changed).
        images: normalised batch ``(N, C, H, W)`` (N >= 1, spatial size >= 7 recommended).
        layer: target layer name; ``channel``: its channel (None = the channel with the largest
            mean spatial-max activation over ``images`` in the original model).
        method: ``"deconvnet"``, ``"guided"`` or ``"gradient"``.
        seed: seeds the re-initialisation (global RNG state is restored).
        max_steps: at most this many randomisation steps (layers grouped top-down if needed).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[0] < 1:
        raise ValueError("images must be a normalised batch tensor (N, C, H, W) with N >= 1, got "
                         f"{type(images).__name__}{tuple(images.shape) if torch.is_tensor(images) else ''}")
    original = unwrap_model(model)
    ref = resolve_layer(original, layer)
    work = copy.deepcopy(original).eval()
    images = images.detach()
    with torch.no_grad():
        act = run_to_layer(work, images, ref.key, select=select)
    if act.dim() < 2:
        raise ValueError(f"layer {layer!r} output has shape {tuple(act.shape)}; expected (N, C, ...)")
    n_ch = act.shape[1]
    if channel is None:
        channel = int(torch.argmax(act.flatten(2).amax(2).mean(0) if act.dim() > 2 else act.mean(0)))
    elif not (0 <= int(channel) < n_ch):
        raise ValueError(f"channel {channel} out of range; layer {layer!r} has {n_ch} channels")
    channel = int(channel)
    below = _layers_below(work, images[:1], ref.key)
    if not below:
        raise ValueError(f"no layer with parameters runs before {layer!r}: nothing to randomise")
    groups, labels = _group(below[::-1], max_steps)
    modules = dict(work.named_modules())

    def run() -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # dead units / no-rule notes: expected here
            return project(work, images, ref.key, channel, method=method, select=select).cpu().numpy()

    base = run()
    projs, names = [base], ["original"]
    sims = [_similarity(b, b) for b in base]
    ssims, rhos = [[s for s, _ in sims]], [[r for _, r in sims]]
    for k, group in enumerate(groups, start=1):
        for j, name in enumerate(group):
            _reinit(modules[name], seed * 100003 + k * 1009 + j)
        p = run()
        projs.append(p)
        sims = [_similarity(b, q) for b, q in zip(base, p)]
        ssims.append([s for s, _ in sims])
        rhos.append([r for _, r in sims])
        names.append(labels[k - 1])
    disp = np.stack([np.stack([np.asarray(display_projection(q, percentile=99.5), dtype=np.float32) for q in p])
                     for p in projs])
    return SanityResult(ref.key, channel, method, tuple(names), np.asarray(ssims, dtype=np.float64),
                        np.asarray(rhos, dtype=np.float64), disp)
