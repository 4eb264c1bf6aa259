"""Fine-tune a pretrained CNN on a small labelled data set and measure what moved, layer by layer.

    >>> from vizlearn.models import load_model
    >>> from vizlearn.datasets import digits
    >>> res = finetune(load_model(), digits(64), recipe="lp-ft", epochs=3)
    >>> res.stages, res.weight_change[-1], res.cka_target[-1], res.accuracy[-1]

What happens
------------
* The caller's model is never touched: training runs on a ``copy.deepcopy``.
* The classifier is found by module identity -- timm ``get_classifier()`` /
  ``reset_classifier(n)``; torchvision ``fc`` or the last ``nn.Linear`` of ``classifier``;
  otherwise the last ``nn.Linear`` -- and replaced by a new ``nn.Linear`` with ``num_classes``
  outputs. Names are never matched by substring (``conv_head`` is a conv layer, not the head).
* Stages (the unit of freezing, of discriminative learning rates and of every measurement):
  timm EfficientNet ``stem`` (conv_stem + bn1), ``blocks.0`` ... ``blocks.6``, ``conv_head``
  (+ bn2), ``head``; ResNet ``stem``, ``layer1`` ... ``layer4``, ``head``; any other model: its
  top-level children that hold parameters.
* Recipes: ``"linear-probe"`` (backbone frozen, head trained on cached pooled features),
  ``"lp-ft"`` (default; linear probe to convergence, then everything unfrozen: head at ``lr``,
  pretrained stages at ``backbone_lr = lr / 5``),
  ``"full"`` (the control: new head and every layer trained at one learning rate from the start),
  ``"discriminative"`` (probe, then stage learning rates spaced geometrically from ``lr_range[0]``
  at the stem to ``lr_range[1]`` at the head, fastai ``slice(lo, hi)``), ``"freeze-to"``
  (probe, then the first ``freeze_to`` stages stay frozen; also written ``"freeze-to:N"``).
* The optimizer (AdamW, weight decay 0.01; or SGD with momentum) holds only trainable
  parameters; frozen ones have ``requires_grad=False`` and stay bitwise equal.
* BatchNorm: ``bn="frozen"`` (default) keeps every BN layer in eval mode during training, so
  running statistics do not move (affine parameters of trainable stages still train).
  ``bn="update"`` lets the statistics follow the target data; their drift is reported separately
  (``bn_mean_drift``/``bn_var_drift``). With small, shifted data this can hurt accuracy a lot.
* Snapshots: ``pretrained``, ``probe`` (end of linear probe, when there is one), ``epoch1`` ...
  At each: per-stage relative weight change ``||W - W0|| / ||W0||`` with its split into angle and
  scale (``||W|| / ||W0||``), the head measured from its initialisation during the probe and from
  the unfreeze point afterwards; linear CKA (float64, centred, flattened maps; ``cka_pool=True``
  for global-average-pooled) against the pretrained network on a fixed probe set of target
  images and of natural photos; the overlap of each unit's top-9 probe images with its
  pretrained top-9 (spatial max per image, one entry per image); test accuracy.
* Per-stage linear-probe accuracy before vs after (scikit-learn logistic regression on
  global-average-pooled stage outputs; Zeiler & Fergus 2014, Table 7 style).
* During training, per batch: loss, accuracy and per-stage activation mean/std, tagged with
  phase (``train``/``val``), part (``probe``/``finetune``), step and epoch.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import unwrap_model
from .similarity import cka_from_grams

__all__ = ["finetune", "FinetuneResult", "model_stages", "find_head", "replace_head", "RECIPES"]

RECIPES = ("linear-probe", "lp-ft", "full", "discriminative", "freeze-to")
_BN = nn.modules.batchnorm._BatchNorm


# --------------------------------------------------------------------------- head & stages
def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier ``(name, module)``, found by module identity (never by name substring).

    timm: ``model.get_classifier()``; torchvision: the ``nn.Linear`` at ``model.fc``, or the
    last ``nn.Linear`` inside ``model.classifier``; otherwise the last ``nn.Linear`` of the model.
    """
    model = unwrap_model(model)
    cand = None
    if callable(getattr(model, "get_classifier", None)):
        c = model.get_classifier()
        if isinstance(c, nn.Module):
            cand = c
    if cand is None and isinstance(getattr(model, "fc", None), nn.Linear):
        cand = model.fc
    if cand is None and isinstance(getattr(model, "classifier", None), nn.Module):
        c = model.classifier
        cand = c if isinstance(c, nn.Linear) else next(
            (m for m in reversed(list(c.modules())) if isinstance(m, nn.Linear)), None)
    if cand is None:
        cand = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    if not isinstance(cand, nn.Linear):
        raise ValueError(
            f"could not find a linear classifier in {type(model).__name__}: expected timm "
            "get_classifier(), torchvision fc/classifier, or some nn.Linear layer")
    for name, m in model.named_modules():
        if m is cand:
            return name, cand
    raise ValueError("the classifier is not a submodule of the model")  # pragma: no cover


def replace_head(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """Replace the classifier (found by :func:`find_head`) in place by a new ``nn.Linear``."""
    name, old = find_head(model)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent = model
    *path, attr = name.split(".")
    for p in path:
        parent = getattr(parent, p)
    if getattr(parent, attr) is not old:  # pragma: no cover - internal invariant
        raise AssertionError("head path does not lead to the head module")
    setattr(parent, attr, new)
    if hasattr(model, "num_classes"):
        try:
            model.num_classes = num_classes
        except Exception:  # noqa: BLE001 - read-only property on some models
            pass
    return name, new


@dataclass(frozen=True)
class _Stage:
    name: str
    modules: tuple[str, ...]  # module names whose parameters belong to the stage
    output: str  # module name whose output is the stage output


def model_stages(model: nn.Module, head_name: str | None = None) -> list[_Stage]:
    """Stages from input to head, as ``_Stage(name, modules, output)``; see module docstring."""
    model = unwrap_model(model)
    if head_name is None:
        head_name = find_head(model)[0]
    kids = dict(model.named_children())
    names = set(dict(model.named_modules()))
    if all(k in kids for k in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        st = [_Stage("stem", ("conv_stem", "bn1"), "bn1")]
        st += [_Stage(f"blocks.{i}", (f"blocks.{i}",), f"blocks.{i}") for i in range(len(model.blocks))]
        st.append(_Stage("conv_head", ("conv_head", "bn2"), "bn2"))
    elif all(k in kids for k in ("conv1", "bn1", "layer1", "layer4")):
        stem = tuple(k for k in ("conv1", "bn1", "relu", "act1", "maxpool") if k in kids)
        st = [_Stage("stem", stem, stem[-1])]
        st += [_Stage(k, (k,), k) for k in ("layer1", "layer2", "layer3", "layer4") if k in kids]
    else:
        st = []
        for k, m in kids.items():
            if head_name == k or head_name.startswith(k + "."):
                continue
            if any(True for _ in m.parameters()):
                st.append(_Stage(k, (k,), k))
        if not st:
            raise ValueError(f"{type(model).__name__}: no parameterised top-level children besides the head")
    assert head_name in names
    st.append(_Stage("head", (head_name,), head_name))
    return st


def _param_stage_index(model: nn.Module, stages: list[_Stage]) -> dict[str, int]:
    """Parameter name -> stage index (the head wins where modules nest; unknown -> last backbone)."""
    out = {}
    for pname, _ in model.named_parameters():
        idx = None
        for i, s in enumerate(stages):
            if any(pname == m or pname.startswith(m + ".") for m in s.modules):
                idx = i
        out[pname] = len(stages) - 2 if idx is None else idx
    return out


def _parse_recipe(recipe: str, freeze_to: int | None) -> tuple[str, int | None]:
    r = str(recipe).strip().lower().replace("_", "-")
    if r.startswith("freeze-to") and r != "freeze-to":
        tail = r[len("freeze-to"):].strip(" :=")
        try:
            freeze_to = int(tail)
        except ValueError:
            raise ValueError(f"recipe {recipe!r}: write 'freeze-to:N' with an integer N") from None
        r = "freeze-to"
    if r not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)} (or 'freeze-to:N')")
    if r == "freeze-to" and (freeze_to is None or freeze_to < 0):
        raise ValueError("recipe 'freeze-to' needs freeze_to=N (number of leading stages kept frozen), N >= 0")
    return r, freeze_to


# --------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class FinetuneResult:
    """Every number measured by :func:`finetune`. S snapshots, G stages, P parameter tensors,
    T recorded steps, B recorded batches, U units shown in the top-9 figure."""

    config: dict
    stages: tuple[str, ...]
    classes: tuple[str, ...]
    snapshots: tuple[str, ...]  # "pretrained", "probe", "epoch1", ...
    snapshot_step: np.ndarray  # (S,) global step at the snapshot
    unfreeze_step: int  # global step at which the backbone was unfrozen (-1: never)
    weight_change: np.ndarray  # (S, G) ||W - W0|| / ||W0|| over all parameters of the stage
    weight_angle: np.ndarray  # (S, G) angle between W and W0, degrees
    weight_scale: np.ndarray  # (S, G) ||W|| / ||W0||
    bn_mean_drift: np.ndarray  # (S, G) relative change of BN running means (NaN: no BN)
    bn_var_drift: np.ndarray  # (S, G) relative change of BN running variances
    cka_target: np.ndarray  # (S, G) linear CKA vs pretrained on target probe images (head NaN)
    cka_natural: np.ndarray  # (S, G) the same on natural photos
    topk_overlap_target: np.ndarray  # (S, G) mean over units of |top9 ∩ top9_pretrained| / 9
    topk_overlap_natural: np.ndarray  # (S, G)
    accuracy: np.ndarray  # (S,) test accuracy (NaN for the pretrained snapshot)
    param_names: tuple[str, ...]
    param_stage: np.ndarray  # (P,) stage index
    param_change: np.ndarray  # (S, P) relative change per parameter tensor (head as above)
    first_conv: str
    filters_before: np.ndarray  # (C, Cin, k, k) first conv weights, pretrained
    filters_after: np.ndarray  # (C, Cin, k, k) after fine-tuning
    filter_cosine: np.ndarray  # (C,) cosine(before, after); NaN for (near-)zero filters
    stage_probe_before: np.ndarray  # (G,) logistic-regression test accuracy on GAP features
    stage_probe_after: np.ndarray  # (G,)
    step: np.ndarray  # (T,) global step of each drift record
    step_drift: np.ndarray  # (T, G) relative weight change after that step
    log_phase: tuple[str, ...]  # (B,) "train" | "val"
    log_part: tuple[str, ...]  # (B,) "probe" | "finetune"
    log_step: np.ndarray  # (B,) global step (val: the step at which it was evaluated)
    log_epoch: np.ndarray  # (B,)
    log_size: np.ndarray  # (B,) batch size
    log_loss: np.ndarray  # (B,)
    log_accuracy: np.ndarray  # (B,)
    log_act_mean: np.ndarray  # (B, G) mean stage output per batch (NaN where not run)
    log_act_std: np.ndarray  # (B, G)
    unit_stage: tuple[str, ...]  # (U,) stages of the units shown in the top-9 figure
    unit_channel: np.ndarray  # (U,)
    unit_before: np.ndarray  # (U, 9) probe image index, pretrained
    unit_after: np.ndarray  # (U, 9) probe image index, fine-tuned
    unit_before_box: np.ndarray  # (U, 9, 4) y0, x0, y1, x1 (input pixels) of the unit's field
    unit_after_box: np.ndarray  # (U, 9, 4)
    probe_images: np.ndarray  # (N, H, W, 3) uint8 target probe images
    runtime_s: float = 0.0
    extra: dict = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)  # the fine-tuned copy (not saved)

    # ---- convenience
    def stage_index(self, stage: str) -> int:
        if stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r}; stages are {self.stages}")
        return self.stages.index(stage)

    def param(self, name: str, snapshot: int = -1) -> float:
        """Relative change of one parameter tensor at a snapshot (default: the last)."""
        return float(self.param_change[snapshot, self.param_names.index(name)])

    def summary(self) -> str:
        g = {s: i for i, s in enumerate(self.stages)}
        mid = self.stages[(len(self.stages) - 1) // 2]
        last_conv = self.stages[-2]
        lines = [f"recipe={self.config.get('recipe')} accuracy={self.accuracy[-1]:.4f} "
                 f"time={self.runtime_s:.0f}s"]
        for s in self.stages:
            i = g[s]
            lines.append(f"  {s:10s} r={100 * self.weight_change[-1, i]:8.3f}%  "
                         f"CKA(target)={self.cka_target[-1, i]:.3f}  CKA(natural)={self.cka_natural[-1, i]:.3f}  "
                         f"top9={self.topk_overlap_target[-1, i]:.2f}")
        lines.append(f"  first conv {self.first_conv}: r={100 * self.param(self.first_conv + '.weight'):.3f}%"
                     f"  mid={mid} last conv={last_conv}")
        return "\n".join(lines)

    # ---- persistence
    def save(self, path) -> Path:
        """Write ``result.json`` (every number), ``arrays.npz`` (exact arrays), and CSVs
        ``stages.csv`` (snapshot x stage x metric), ``params.csv``, ``log.csv``, ``steps.csv``,
        ``filters.csv``, ``stage_probe.csv`` into the directory ``path``."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        arrays, meta = {}, {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "model":
                continue
            if isinstance(v, np.ndarray):
                arrays[f.name] = v
            else:
                meta[f.name] = v
        np.savez_compressed(d / "arrays.npz", **arrays)
        js = dict(meta)
        js.update({k: v.tolist() for k, v in arrays.items() if k != "probe_images"})
        (d / "result.json").write_text(json.dumps(_jsonable(js), indent=1, allow_nan=True))
        metrics = ["weight_change", "weight_angle", "weight_scale", "bn_mean_drift", "bn_var_drift",
                   "cka_target", "cka_natural", "topk_overlap_target", "topk_overlap_natural"]
        with open(d / "stages.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["snapshot", "step", "stage", *metrics, "accuracy"])
            for si, snap in enumerate(self.snapshots):
                for gi, st in enumerate(self.stages):
                    w.writerow([snap, int(self.snapshot_step[si]), st,
                                *[_num(getattr(self, m)[si, gi]) for m in metrics], _num(self.accuracy[si])])
        with open(d / "params.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["parameter", "stage", *self.snapshots])
            for pi, name in enumerate(self.param_names):
                w.writerow([name, self.stages[int(self.param_stage[pi])],
                            *[_num(v) for v in self.param_change[:, pi]]])
        with open(d / "log.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["phase", "part", "step", "epoch", "batch_size", "loss", "accuracy",
                        *[f"act_mean:{s}" for s in self.stages], *[f"act_std:{s}" for s in self.stages]])
            for b in range(len(self.log_phase)):
                w.writerow([self.log_phase[b], self.log_part[b], int(self.log_step[b]), int(self.log_epoch[b]),
                            int(self.log_size[b]), _num(self.log_loss[b]), _num(self.log_accuracy[b]),
                            *[_num(v) for v in self.log_act_mean[b]], *[_num(v) for v in self.log_act_std[b]]])
        with open(d / "steps.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", *self.stages])
            for t in range(len(self.step)):
                w.writerow([int(self.step[t]), *[_num(v) for v in self.step_drift[t]]])
        with open(d / "filters.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filter", "norm_before", "norm_after", "cosine"])
            for c in range(len(self.filter_cosine)):
                w.writerow([c, _num(np.linalg.norm(self.filters_before[c])),
                            _num(np.linalg.norm(self.filters_after[c])), _num(self.filter_cosine[c])])
        with open(d / "stage_probe.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["stage", "probe_accuracy_before", "probe_accuracy_after"])
            for gi, st in enumerate(self.stages):
                w.writerow([st, _num(self.stage_probe_before[gi]), _num(self.stage_probe_after[gi])])
        return d

    @classmethod
    def load(cls, path) -> "FinetuneResult":
        d = Path(path)
        if not (d / "result.json").is_file():
            raise ValueError(f"{str(d)!r} holds no result.json written by FinetuneResult.save")
        js = json.loads((d / "result.json").read_text())
        with np.load(d / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
        kw = {}
        for f in fields(cls):
            if f.name in arrays:
                kw[f.name] = arrays[f.name]
            elif f.name in js:
                v = js[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)


def _num(v) -> str:
    v = float(v)
    return "nan" if math.isnan(v) else repr(v)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


# --------------------------------------------------------------------------- helpers
def _normalise(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def _rel(now: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(||now - ref|| / ||ref||, angle in degrees, ||now|| / ||ref||); NaN if ref is zero."""
    n0 = float(ref.norm())
    if n0 == 0.0 or now.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    n1 = float(now.norm())
    r = float((now - ref).norm()) / n0
    cos = float(torch.dot(now, ref)) / (n0 * n1) if n1 > 0 else 0.0
    return r, math.degrees(math.acos(max(-1.0, min(1.0, cos)))), n1 / n0


class _Callbacks:
    """Dispatch to user callbacks: objects with optional ``on_batch_end(record)``,
    ``on_epoch_end(info)``, ``on_end(info)`` methods, or callables ``f(event, info)``."""

    def __init__(self, callbacks):
        self.cbs = list(callbacks or ())

    def __call__(self, event: str, info: dict):
        for cb in self.cbs:
            fn = getattr(cb, f"on_{event}", None)
            if fn is not None:
                fn(info)
            elif callable(cb) and not hasattr(cb, "on_batch_end") and not hasattr(cb, "on_end"):
                cb(event, info)

    def end(self, info: dict):
        """Teardown: every callback's ``on_end`` runs; failures become warnings, never raise."""
        for cb in self.cbs:
            try:
                fn = getattr(cb, "on_end", None)
                if fn is not None:
                    fn(info)
                elif callable(cb) and not hasattr(cb, "on_batch_end"):
                    cb("end", info)
            except Exception as e:  # noqa: BLE001 - teardown never raises
                warnings.warn(f"callback {cb!r} raised in on_end: {e!r} (ignored)", RuntimeWarning, stacklevel=2)


class _Log:
    def __init__(self, n_stages: int):
        self.rows: list[tuple] = []
        self.g = n_stages

    def add(self, phase, part, step, epoch, size, loss, acc, act=None):
        mean = np.full(self.g, np.nan)
        std = np.full(self.g, np.nan)
        if act:
            for i, (m, s) in act.items():
                mean[i], std[i] = m, s
        self.rows.append((phase, part, int(step), int(epoch), int(size), float(loss), float(acc), mean, std))
        return {"phase": phase, "part": part, "step": int(step), "epoch": int(epoch), "batch_size": int(size),
                "loss": float(loss), "accuracy": float(acc)}


# --------------------------------------------------------------------------- analysis
class _Probe:
    """Fixed probe sets and the pretrained reference: centred Grams, top-9 sets, GAP features."""

    def __init__(self, model, stages, target, natural, *, batch_size, cka_pool, k=9):
        self.model, self.stages, self.k, self.pool, self.bs = model, stages, k, cka_pool, batch_size
        self.sets = {"target": target, "natural": natural}

    def measure(self, model=None):
        """Per set: {stage index: (centred Gram (N,N), top-k image indices (C,k), argmax positions
        (N,C,2) or None, spread (std over images) of each unit's spatial max (C,))}."""
        model = self.model if model is None else model
        out = {}
        for key, x in self.sets.items():
            if x is None or len(x) < 2:
                out[key] = None
                continue
            feats = _stage_outputs(model, self.stages, x, batch_size=self.bs)
            self.map_hw = {i: tuple(f.shape[2:4]) if f.ndim == 4 else (1, 1) for i, f in feats.items()}
            res = {}
            for i, f in feats.items():
                if f.ndim == 4:
                    flat = f.mean(dim=(2, 3)) if self.pool else f.reshape(f.shape[0], -1)
                    spatial = f.reshape(f.shape[0], f.shape[1], -1)
                    smax, arg = spatial.max(dim=2)
                    smean = spatial.mean(dim=2)
                    pos = torch.stack([arg // f.shape[3], arg % f.shape[3]], dim=-1)
                else:
                    flat = f.reshape(f.shape[0], -1)
                    smax, smean, pos = flat, flat, None
                xd = flat.double()
                xd = xd - xd.mean(dim=0, keepdim=True)
                gram = (xd @ xd.T).numpy()
                k = min(self.k, smax.shape[0])
                # rank images per unit by spatial max; ties (ReLU6 saturates at 6) broken by the
                # spatial mean, then by the lower image index
                a, b = smax.double().numpy(), smean.double().numpy()
                top = np.stack([np.lexsort((-b[:, c], -a[:, c]))[:k] for c in range(a.shape[1])])
                sel = a.std(axis=0)
                res[i] = (gram, top, None if pos is None else pos.numpy(), sel)
            out[key] = res
        return out


def _stage_outputs(model, stages, x: torch.Tensor, *, batch_size: int, pool_only=False) -> dict[int, torch.Tensor]:
    """Run ``x`` through ``model`` in eval mode; outputs of every non-head stage (float32, CPU)."""
    from .capture import capture
    from .state import eval_mode

    names = [s.output for s in stages[:-1]]
    device = next(model.parameters()).device
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


def _stage_probe_accuracy(model, stages, x_tr, y_tr, x_te, y_te, *, batch_size, seed) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ftr = _stage_outputs(model, stages, x_tr, batch_size=batch_size, pool_only=True)
    fte = _stage_outputs(model, stages, x_te, batch_size=batch_size, pool_only=True)
    acc = np.full(len(stages), np.nan)
    for i in ftr:
        a, b = ftr[i].reshape(len(x_tr), -1).double().numpy(), fte[i].reshape(len(x_te), -1).double().numpy()
        sc = StandardScaler().fit(a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(max_iter=300, C=1.0, random_state=seed).fit(sc.transform(a), y_tr)
        acc[i] = clf.score(sc.transform(b), y_te)
    return acc


def _unit_boxes(model, layer: str, positions: np.ndarray, size: int) -> np.ndarray:
    """(k, 2) feature-map positions -> (k, 4) receptive-field boxes (clipped to the image)."""
    try:
        from .receptive_field import receptive_field, unit_box

        fld = receptive_field(model, layer, input_size=size)
        return np.array([unit_box(fld, (int(r), int(c)), (size, size)) for r, c in positions], dtype=np.int64)
    except Exception:  # noqa: BLE001 - receptive_field unavailable: show whole images
        return np.tile(np.array([0, 0, size, size], dtype=np.int64), (len(positions), 1))


# --------------------------------------------------------------------------- main
def finetune(
    model,
    dataset,
    *,
    recipe: str = "lp-ft",
    epochs: int = 3,
    lr: float = 1e-3,
    backbone_lr: float | None = None,
    lr_range: tuple[float, float] | None = None,
    freeze_to: int | None = None,
    probe: bool | None = None,
    probe_steps: int = 100,
    probe_l2: float = 1e-3,
    warmup: float = 0.1,
    schedule: str = "cosine",
    optimizer: str = "adamw",
    weight_decay: float = 0.01,
    momentum: float = 0.9,
    batch_size: int = 64,
    bn: str = "frozen",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    n_probe: int = 200,
    natural_images: np.ndarray | None = None,
    cka_pool: bool = False,
    stage_probe: bool = True,
    track_steps: bool = True,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    callbacks: Sequence = (),
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on ``dataset`` and measure per-stage drift.

    Parameters
    ----------
    model : a :class:`~vizlearn.models.LoadedModel` (its mean/std normalise the images) or an
        ``nn.Module`` (then pass ``mean``/``std``; default ImageNet's). Never modified.
    dataset : a :class:`~vizlearn.datasets.Dataset` (``digits()``, ``lfw()``, ``image_folder()``).
    recipe : ``"lp-ft"`` (default), ``"linear-probe"``, ``"full"``, ``"discriminative"``,
        ``"freeze-to"`` (with ``freeze_to=N``) or ``"freeze-to:N"``.
    epochs : fine-tuning epochs after the probe (ignored by the linear-probe recipe).
    lr : learning rate of the head in the fine-tuning phase; of every layer for ``"full"``.
    backbone_lr : learning rate of the pretrained stages for ``"lp-ft"`` and ``"freeze-to"``;
        default ``lr / 5`` (the reference measurement: backbone 2e-4, head 1e-3). Pass
        ``backbone_lr=lr`` for a uniform rate after the probe.
    lr_range : ``(lo, hi)`` for ``discriminative``; default ``(lr / 100, lr)`` (fastai lr_mult=100).
    probe : run the linear probe first; default True except for ``"full"``.
    probe_steps, probe_l2 : the probe fits the new head on cached pooled features: multinomial
        logistic regression with L2 penalty ``probe_l2 / 2 * ||W||^2`` (mean cross-entropy),
        full-batch L-BFGS until the objective stops changing (at most ``probe_steps`` iterations).
    warmup : fraction of the fine-tuning steps with a linear learning-rate warm-up from 0 (then
        ``schedule``). Adam's first steps move every weight by about ``lr`` whatever the
        gradient; without warm-up they can wreck a converged probe.
    schedule : after the warm-up, ``"cosine"`` (default; decays to 0 at the last step) or
        ``"constant"``.
    optimizer : ``"adamw"`` (default) or ``"sgd"`` (with ``momentum``); ``weight_decay`` 0.01.
    bn : ``"frozen"`` (BN layers in eval mode: running statistics fixed) or ``"update"``.
    n_probe : number of target test images in the fixed probe set (CKA, top-9 overlap).
    natural_images : (M, H, W, 3) [0, 1] natural photos for the second CKA probe set; default
        the built-in sample photos with crops at the data set's size. ``False`` to skip.
    cka_pool : CKA on global-average-pooled instead of flattened stage outputs.
    stage_probe : compute per-stage logistic-regression accuracy before/after (a few seconds each).
    track_steps : record per-stage weight change after every step (for the drift-over-steps plot).
    seed, device, progress : reproducibility (the caller's global RNG state is restored),
        where to train, tqdm progress bars.
    callbacks : objects with optional ``on_batch_end(record)``, ``on_epoch_end(info)``,
        ``on_end(info)``, or callables ``f(event, info)``. ``on_end`` always runs; its errors
        are turned into warnings.

    Returns a :class:`FinetuneResult`.
    """
    t_start = time.time()
    recipe, freeze_to = _parse_recipe(recipe, freeze_to)
    if bn not in ("frozen", "update"):
        raise ValueError(f"bn must be 'frozen' or 'update', got {bn!r}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup!r}")
    for nm, v in (("epochs", epochs), ("batch_size", batch_size), ("probe_steps", probe_steps)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if nm == "epochs" else 1):
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    for nm in ("x_train", "y_train", "x_test", "y_test", "classes"):
        if not hasattr(dataset, nm):
            raise TypeError(f"dataset must be a vizlearn.datasets.Dataset (missing {nm!r}), got {type(dataset).__name__}")
    if len(dataset.x_test) < 2 or len(dataset.x_train) < 2:
        raise ValueError("dataset needs at least 2 training and 2 test images")
    if probe is None:
        probe = recipe != "full"
    if recipe == "linear-probe":
        probe = True

    if mean is None:
        mean = getattr(model, "mean", (0.485, 0.456, 0.406))
    if std is None:
        std = getattr(model, "std", (0.229, 0.224, 0.225))
    src = unwrap_model(model)
    if not isinstance(src, nn.Module):
        raise TypeError(f"model must be a LoadedModel or nn.Module, got {type(model).__name__}")

    n_classes = len(dataset.classes)
    size = int(dataset.x_train.shape[1])
    config = dict(recipe=recipe, epochs=int(epochs), lr=float(lr), backbone_lr=backbone_lr, lr_range=list(lr_range) if lr_range else None,
                  freeze_to=freeze_to, probe=bool(probe), probe_steps=int(probe_steps), probe_l2=float(probe_l2),
                  warmup=float(warmup), schedule=schedule,
                  optimizer=optimizer, weight_decay=float(weight_decay), momentum=float(momentum),
                  batch_size=int(batch_size), bn=bn, seed=int(seed), n_probe=int(n_probe), cka_pool=bool(cka_pool),
                  dataset=getattr(dataset, "name", "?"), size=size, model=getattr(model, "name", type(src).__name__),
                  mean=list(mean), std=list(std))

    cbs = _Callbacks(callbacks)
    bars: list = []
    handles: list = []
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return _run(src, dataset, config, cbs, bars, handles, t_start, recipe=recipe, epochs=epochs, lr=lr,
                        backbone_lr=backbone_lr, lr_range=lr_range, freeze_to=freeze_to, probe=probe, probe_steps=probe_steps,
                        probe_l2=probe_l2, warmup=warmup, schedule=schedule, optimizer=optimizer, weight_decay=weight_decay, momentum=momentum,
                        batch_size=batch_size, bn=bn, mean=mean, std=std, n_probe=n_probe,
                        natural_images=natural_images, cka_pool=cka_pool, stage_probe=stage_probe,
                        track_steps=track_steps, seed=seed, device=device, progress=progress,
                        n_classes=n_classes, size=size)
    finally:
        for h in handles:
            try:
                h.remove()
            except Exception:  # noqa: BLE001 - teardown never raises
                pass
        for b in bars:
            try:
                b.close()
            except Exception:  # noqa: BLE001
                pass
        cbs.end({"runtime_s": time.time() - t_start})


def _default_natural(size: int) -> np.ndarray | None:
    try:
        from .images import image_set, sample_photos

        return image_set(sample_photos(), size=size, crops=8, seed=0).images
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"natural photo probe set unavailable ({e!r}); CKA on natural photos skipped",
                      RuntimeWarning, stacklevel=3)
        return None


def _run(src, dataset, config, cbs, bars, handles, t_start, *, recipe, epochs, lr, backbone_lr, lr_range, freeze_to, probe,
         probe_steps, probe_l2, warmup, schedule, optimizer, weight_decay, momentum, batch_size, bn, mean, std, n_probe,
         natural_images, cka_pool, stage_probe, track_steps, seed, device, progress, n_classes, size):
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    model = copy.deepcopy(src).to(device)
    model.eval()
    head_name, head = replace_head(model, n_classes)
    stages = model_stages(model, head_name)
    G = len(stages)
    H = G - 1
    pstage = _param_stage_index(model, stages)
    params = dict(model.named_parameters())
    pnames = tuple(params)
    for p in params.values():
        p.requires_grad_(True)

    x_tr = _normalise(dataset.x_train, mean, std)
    x_te = _normalise(dataset.x_test, mean, std)
    y_tr = torch.as_tensor(np.asarray(dataset.y_train), dtype=torch.long)
    y_te = torch.as_tensor(np.asarray(dataset.y_test), dtype=torch.long)

    # fixed probe sets: n_probe test images spread over the test set; natural photos
    pidx = np.linspace(0, len(x_te) - 1, num=min(n_probe, len(x_te))).round().astype(int)
    pidx = np.unique(pidx)
    if natural_images is None:
        natural_images = _default_natural(size)
    nat = None
    if natural_images is not False and natural_images is not None and len(natural_images) >= 2:
        nat = _normalise(np.asarray(natural_images, dtype=np.float32), mean, std)
    prober = _Probe(model, stages, x_te[pidx], nat, batch_size=batch_size, cka_pool=cka_pool)

    # ---- pretrained reference
    ref = {n: p.detach().clone() for n, p in params.items()}
    ref_buf = {n: b.detach().clone() for n, b in model.named_buffers()}
    stage_params = [[n for n in pnames if pstage[n] == g] for g in range(G)]
    bn_bufs = [[n for n, _ in model.named_buffers() if (n.endswith("running_mean") or n.endswith("running_var"))
                and any(n == m or n.startswith(m + ".") for m in stages[g].modules)] for g in range(G)]
    conv_name = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)) \
        if any(isinstance(m, nn.Conv2d) for m in model.modules()) else None
    pre_measure = prober.measure()
    probe_before = (_stage_probe_accuracy(model, stages, x_tr, dataset.y_train, x_te, dataset.y_test,
                                          batch_size=batch_size, seed=seed) if stage_probe else np.full(G, np.nan))

    head_ref = {n: ref[n] for n in stage_params[H]}  # head measured from its init until unfreeze
    snaps: list[dict] = []
    step_rows: list[tuple[int, np.ndarray]] = []
    log = _Log(G)
    state = {"step": 0, "unfreeze": -1}

    ref_norm = {}

    def drift_now():
        d = np.full(G, np.nan)
        with torch.no_grad():
            for g in range(G):
                names = stage_params[g]
                base = [head_ref[n] if g == H else ref[n] for n in names]
                key = (g, state["unfreeze"] if g == H else -2)
                if key not in ref_norm:
                    ref_norm[key] = math.sqrt(sum(float(torch.sum(b.double() ** 2)) for b in base))
                num = sum(float(torch.sum((params[n].detach() - b) ** 2, dtype=torch.float64))
                          for n, b in zip(names, base))
                d[g] = math.sqrt(num) / ref_norm[key] if ref_norm[key] > 0 else float("nan")
        return d

    def snapshot(name, acc):
        meas = prober.measure() if name != "pretrained" else pre_measure
        row = {"name": name, "step": state["step"], "acc": acc}
        wc, wa, ws, bm, bv = (np.full(G, np.nan) for _ in range(5))
        for g in range(G):
            names = stage_params[g]
            base = [head_ref[n] if g == H else ref[n] for n in names]
            wc[g], wa[g], ws[g] = _rel(_flat([params[n] for n in names]), _flat(base))
            mb = [n for n in bn_bufs[g] if n.endswith("running_mean")]
            vb = [n for n in bn_bufs[g] if n.endswith("running_var")]
            bufs = dict(model.named_buffers())
            if mb:
                bm[g] = _rel(_flat([bufs[n] for n in mb]), _flat([ref_buf[n] for n in mb]))[0]
                bv[g] = _rel(_flat([bufs[n] for n in vb]), _flat([ref_buf[n] for n in vb]))[0]
        pc = np.array([_rel(_flat([params[n]]), _flat([head_ref[n] if pstage[n] == H else ref[n]]))[0]
                       for n in pnames])
        row.update(wc=wc, wa=wa, ws=ws, bm=bm, bv=bv, pc=pc, meas=meas)
        for key in ("target", "natural"):
            cka = np.full(G, np.nan)
            ov = np.full(G, np.nan)
            if meas.get(key) is not None:
                for g, (gram, top, _, _) in meas[key].items():
                    g0, t0 = pre_measure[key][g][0], pre_measure[key][g][1]
                    cka[g] = cka_from_grams(gram, g0)
                    ov[g] = np.mean([len(set(a) & set(b)) / top.shape[1] for a, b in zip(top, t0)])
            row["cka_" + key] = cka
            row["ov_" + key] = ov
        snaps.append(row)

    snapshot("pretrained", float("nan"))

    # ---- linear probe on cached pooled features
    def head_input(x):
        box = []
        h = head.register_forward_pre_hook(lambda m, a: box.append(a[0].detach().float().cpu()))
        handles.append(h)
        try:
            from .state import eval_mode
            with eval_mode(model), torch.no_grad():
                for b in range(0, len(x), batch_size):
                    model(x[b:b + batch_size].to(device))
        finally:
            h.remove()
        return torch.cat(box).reshape(len(x), -1)

    if probe:
        for p in params.values():
            p.requires_grad_(False)
        f_tr, f_te = head_input(x_tr), head_input(x_te)
        hp = [head.weight] + ([head.bias] if head.bias is not None else [])
        for p in hp:
            p.requires_grad_(True)
        # L2-regularised multinomial logistic regression on the cached features, full batch,
        # L-BFGS to convergence: a well-defined optimum with a bounded head norm (an unregularised
        # or over-trained head makes the first fine-tuning steps blow up).
        opt = torch.optim.LBFGS(hp, lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
        f_tr_d, y_tr_d = f_tr.to(device), y_tr.to(device)
        eval_every = max(1, probe_steps // 10)

        def closure():
            opt.zero_grad(set_to_none=True)
            ce = F.cross_entropy(head(f_tr_d), y_tr_d)
            total = ce + 0.5 * probe_l2 * head.weight.pow(2).sum()
            total.backward()
            return total

        bar = tqdm(total=probe_steps, desc=f"{recipe}: linear probe", disable=not progress, leave=False)
        bars.append(bar)
        prev, acc = None, float("nan")
        for it in range(1, probe_steps + 1):
            obj = float(opt.step(closure).detach())
            state["step"] += 1
            with torch.no_grad():
                out = head(f_tr_d)
                ce = float(F.cross_entropy(out, y_tr_d))
                tr_acc = float((out.argmax(1) == y_tr_d).float().mean())
            cbs("batch_end", log.add("train", "probe", state["step"], 0, len(f_tr), ce, tr_acc))
            if track_steps:
                step_rows.append((state["step"], drift_now()))
            done = prev is not None and abs(prev - obj) <= 1e-7 * max(1.0, abs(obj))
            prev = obj
            if it % eval_every == 0 or done or it == probe_steps:
                acc = _eval_head(head, f_te, y_te, batch_size, device, log, state["step"], 0, cbs)
                bar.set_postfix(loss=f"{ce:.4f}", acc=f"{acc:.3f}")
            bar.update(1)
            if done:
                break
        cbs("epoch_end", {"part": "probe", "epoch": 0, "accuracy": acc, "loss": ce, "iterations": it})
        config["probe_iterations"] = it
        bar.close()
        for p in hp:
            p.requires_grad_(False)
        snapshot("probe", acc)
        del opt

    # ---- fine-tuning
    ft_epochs = 0 if recipe == "linear-probe" else int(epochs)
    if ft_epochs > 0:
        n_frozen = freeze_to if recipe == "freeze-to" else 0
        trainable = [g for g in range(G) if g >= min(n_frozen, H)]
        if recipe == "discriminative":
            lo, hi = lr_range if lr_range is not None else (lr / 100.0, lr)
            if not (0 < lo <= hi):
                raise ValueError(f"lr_range must be (lo, hi) with 0 < lo <= hi, got {lr_range!r}")
            glr = {g: lo * (hi / lo) ** (g / max(G - 1, 1)) for g in range(G)}
        elif recipe == "full":
            glr = {g: lr for g in range(G)}
        else:  # lp-ft, freeze-to: the new head at lr, the pretrained stages at backbone_lr
            blr = lr / 5.0 if backbone_lr is None else backbone_lr
            glr = {g: (lr if g == H else blr) for g in range(G)}
        groups = []
        for g in trainable:
            ps = [params[n] for n in stage_params[g]]
            for p in ps:
                p.requires_grad_(True)
            if ps:
                groups.append({"params": ps, "lr": glr[g], "name": stages[g].name})
        config["stage_lr"] = {stages[g].name: (glr[g] if g in trainable else 0.0) for g in range(G)}
        if optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        for grp in opt.param_groups:
            grp["base_lr"] = grp["lr"]
        n_total = ft_epochs * math.ceil(len(x_tr) / batch_size)
        n_warm = int(round(warmup * n_total))

        def lr_factor(t):  # t = 1 .. n_total
            if t <= n_warm:
                return t / n_warm
            if schedule == "constant":
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * (t - n_warm) / (n_total - n_warm + 1)))

        ft_step = 0
        state["unfreeze"] = state["step"]
        head_ref = {n: params[n].detach().clone() for n in stage_params[H]}
        act: dict[int, tuple[float, float]] = {}

        def stat_hook(g):
            def hook(m, i, o):
                if torch.is_tensor(o):
                    od = o.detach()
                    act[g] = (float(od.float().mean()), float(od.float().std()))
            return hook

        mods = dict(model.named_modules())
        for g, s in enumerate(stages):
            handles.append(mods[s.output].register_forward_hook(stat_hook(g)))

        for ep in range(1, ft_epochs + 1):
            model.train()
            if bn == "frozen":
                for m in model.modules():
                    if isinstance(m, _BN):
                        m.eval()
            perm = torch.from_numpy(rng.permutation(len(x_tr)))
            nb = math.ceil(len(perm) / batch_size)
            bar = tqdm(total=nb, desc=f"{recipe}: epoch {ep}/{ft_epochs}", disable=not progress, leave=False)
            bars.append(bar)
            for b in range(0, len(perm), batch_size):
                idx = perm[b:b + batch_size]
                xb, yb = x_tr[idx].to(device), y_tr[idx].to(device)
                act.clear()
                ft_step += 1
                for grp in opt.param_groups:
                    grp["lr"] = grp["base_lr"] * lr_factor(ft_step)
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state["step"] += 1
                rec = log.add("train", "finetune", state["step"], ep, len(idx), loss.item(),
                              float((out.argmax(1) == yb).float().mean()), dict(act))
                cbs("batch_end", rec)
                if track_steps:
                    step_rows.append((state["step"], drift_now()))
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.close()
            acc = _eval_model(model, x_te, y_te, batch_size, device, log, state["step"], ep, cbs, act)
            cbs("epoch_end", {"part": "finetune", "epoch": ep, "accuracy": acc, "model": model})
            snapshot(f"epoch{ep}", acc)
        for h in handles:
            h.remove()
        handles.clear()
        model.eval()

    # ---- after: filters, per-stage probe, units for the top-9 figure
    probe_after = (_stage_probe_accuracy(model, stages, x_tr, dataset.y_train, x_te, dataset.y_test,
                                         batch_size=batch_size, seed=seed) if stage_probe else np.full(G, np.nan))
    if conv_name is not None:
        fb = ref[conv_name + ".weight"].float().numpy()
        fa = params[conv_name + ".weight"].detach().float().cpu().numpy()
        a64, b64 = fb.reshape(len(fb), -1).astype(np.float64), fa.reshape(len(fa), -1).astype(np.float64)
        nb_, na_ = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
        cos = np.sum(a64 * b64, axis=1) / np.maximum(nb_ * na_, 1e-300)
        cos[nb_ < 1e-3 * nb_.max()] = np.nan  # (near-)zero filters: direction undefined
    else:
        fb = fa = np.zeros((0, 3, 1, 1), np.float32)
        cos = np.zeros(0)

    last = snaps[-1]["meas"]["target"]
    first = pre_measure["target"]
    ustage, uch, ub, ua, ubb, uab = [], [], [], [], [], []
    for g in (0, H - 1):
        _, top0, pos0, act0 = first[g]
        _, top1, pos1, _ = last[g]
        if pos0 is None:
            continue
        # the most selective unit under the pretrained network: largest spread of its spatial
        # max over the probe images (constant units, e.g. zero filters after BN, are never chosen),
        # preferring units whose top-9 maxima lie inside the map (border maxima are padding effects)
        fh, fw = _map_hw(prober, g)
        r_, c_ = pos0[top0, np.arange(top0.shape[0])[:, None], 0], pos0[top0, np.arange(top0.shape[0])[:, None], 1]
        inside = ((r_ > 0) & (r_ < fh - 1) & (c_ > 0) & (c_ < fw - 1)).mean(axis=1)
        score = np.where(inside >= 0.5, act0, act0 - np.inf) if (inside >= 0.5).any() else act0
        ch = int(np.argmax(score))
        ustage.append(stages[g].name)
        uch.append(ch)
        ub.append(top0[ch])
        ua.append(top1[ch])
        ubb.append(_unit_boxes(model, stages[g].output, pos0[top0[ch], ch], size))
        uab.append(_unit_boxes(model, stages[g].output, pos1[top1[ch], ch], size))

    def arr(key):
        return np.array([s[key] for s in snaps], dtype=np.float64)

    steps = np.array([r[0] for r in step_rows], dtype=np.int64)
    sd = np.array([r[1] for r in step_rows], dtype=np.float64).reshape(len(step_rows), G)
    rows = log.rows
    result = FinetuneResult(
        config=config,
        stages=tuple(s.name for s in stages),
        classes=tuple(dataset.classes),
        snapshots=tuple(s["name"] for s in snaps),
        snapshot_step=np.array([s["step"] for s in snaps], dtype=np.int64),
        unfreeze_step=int(state["unfreeze"]),
        weight_change=arr("wc"), weight_angle=arr("wa"), weight_scale=arr("ws"),
        bn_mean_drift=arr("bm"), bn_var_drift=arr("bv"),
        cka_target=arr("cka_target"), cka_natural=arr("cka_natural"),
        topk_overlap_target=arr("ov_target"), topk_overlap_natural=arr("ov_natural"),
        accuracy=np.array([s["acc"] for s in snaps], dtype=np.float64),
        param_names=pnames, param_stage=np.array([pstage[n] for n in pnames], dtype=np.int64),
        param_change=arr("pc"),
        first_conv=conv_name or "",
        filters_before=fb, filters_after=fa, filter_cosine=np.asarray(cos, dtype=np.float64),
        stage_probe_before=np.asarray(probe_before, dtype=np.float64),
        stage_probe_after=np.asarray(probe_after, dtype=np.float64),
        step=steps, step_drift=sd,
        log_phase=tuple(r[0] for r in rows), log_part=tuple(r[1] for r in rows),
        log_step=np.array([r[2] for r in rows], dtype=np.int64),
        log_epoch=np.array([r[3] for r in rows], dtype=np.int64),
        log_size=np.array([r[4] for r in rows], dtype=np.int64),
        log_loss=np.array([r[5] for r in rows], dtype=np.float64),
        log_accuracy=np.array([r[6] for r in rows], dtype=np.float64),
        log_act_mean=np.array([r[7] for r in rows], dtype=np.float64).reshape(len(rows), G),
        log_act_std=np.array([r[8] for r in rows], dtype=np.float64).reshape(len(rows), G),
        unit_stage=tuple(ustage), unit_channel=np.array(uch, dtype=np.int64),
        unit_before=np.array(ub, dtype=np.int64).reshape(len(ub), -1),
        unit_after=np.array(ua, dtype=np.int64).reshape(len(ua), -1),
        unit_before_box=np.array(ubb, dtype=np.int64).reshape(len(ubb), -1, 4),
        unit_after_box=np.array(uab, dtype=np.int64).reshape(len(uab), -1, 4),
        probe_images=(np.clip(np.asarray(dataset.x_test)[pidx], 0, 1) * 255).round().astype(np.uint8),
        runtime_s=time.time() - t_start,
        model=model,
    )
    return result


def _map_hw(prober: _Probe, g: int) -> tuple[int, int]:
    return prober.map_hw[g]


def _eval_head(head, f_te, y_te, batch_size, device, log, step, epoch, cbs) -> float:
    correct = 0
    with torch.no_grad():
        for b in range(0, len(f_te), batch_size):
            fx, fy = f_te[b:b + batch_size].to(device), y_te[b:b + batch_size].to(device)
            out = head(fx)
            c = int((out.argmax(1) == fy).sum())
            correct += c
            cbs("batch_end", log.add("val", "probe", step, epoch, len(fy), float(F.cross_entropy(out, fy)),
                                     c / len(fy)))
    return correct / len(f_te)


def _eval_model(model, x_te, y_te, batch_size, device, log, step, epoch, cbs, act) -> float:
    from .state import eval_mode

    correct = 0
    with eval_mode(model), torch.no_grad():
        for b in range(0, len(x_te), batch_size):
            xb, yb = x_te[b:b + batch_size].to(device), y_te[b:b + batch_size].to(device)
            act.clear()
            out = model(xb)
            c = int((out.argmax(1) == yb).sum())
            correct += c
            cbs("batch_end", log.add("val", "finetune", step, epoch, len(yb), float(F.cross_entropy(out, yb)),
                                     c / len(yb), dict(act)))
    return correct / len(x_te)
