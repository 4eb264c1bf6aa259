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
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import drift
from .images import to_tensor
from .layer1 import first_conv
from .layers import unwrap_model

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
    _check_args(dataset, bn=bn, optimizer=optimizer, schedule=schedule, warmup=warmup, epochs=epochs,
                batch_size=batch_size, probe_steps=probe_steps, lr=lr)
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


def _check_args(dataset, *, bn, optimizer, schedule, warmup, epochs, batch_size, probe_steps, lr):
    """ValueError/TypeError for bad options of :func:`finetune`."""
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


def _default_natural(size: int) -> np.ndarray | None:
    try:
        from .images import image_set, sample_photos

        return image_set(sample_photos(), size=size, crops=8, seed=0).images
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"natural photo probe set unavailable ({e!r}); CKA on natural photos skipped",
                      RuntimeWarning, stacklevel=3)
        return None


@dataclass(eq=False)
class _Session:
    """Mutable state of one run, shared by its phases (the model copy, references, records)."""

    model: nn.Module
    head: nn.Linear
    stages: list
    params: dict  # name -> parameter of the model copy
    pstage: dict  # name -> stage index
    stage_params: list  # (G,) parameter names per stage
    bn_bufs: list  # (G,) BN running-statistic buffer names per stage
    ref: dict  # pretrained parameters
    ref_buf: dict  # pretrained buffers
    sets: dict  # probe sets "target"/"natural": normalised images or None
    log: _Log
    cbs: _Callbacks
    bars: list
    handles: list
    pre: dict = field(default_factory=dict)  # pretrained measurement of the probe sets
    head_ref: dict = field(default_factory=dict)  # head reference: its init, then the unfreeze point
    step: int = 0
    unfreeze: int = -1
    snaps: list = field(default_factory=list)
    step_rows: list = field(default_factory=list)
    ref_norm: dict = field(default_factory=dict)

    @property
    def pnames(self) -> tuple[str, ...]:
        return tuple(self.params)

    def bases(self) -> list[dict]:
        """Per stage: parameter name -> reference (the head's own reference for the head)."""
        H = len(self.stages) - 1
        return [{n: (self.head_ref[n] if g == H else self.ref[n]) for n in names}
                for g, names in enumerate(self.stage_params)]


def _run(src, dataset, config, cbs, bars, handles, t_start, **opts):
    o = SimpleNamespace(**opts)
    rng = np.random.default_rng(o.seed)
    model = copy.deepcopy(src).to(o.device)
    model.eval()
    head_name, head = replace_head(model, o.n_classes)
    stages = model_stages(model, head_name)
    G = len(stages)
    pstage = _param_stage_index(model, stages)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)

    x_tr = to_tensor(dataset.x_train, mean=o.mean, std=o.std)
    x_te = to_tensor(dataset.x_test, mean=o.mean, std=o.std)
    y_tr = torch.as_tensor(np.asarray(dataset.y_train), dtype=torch.long)
    y_te = torch.as_tensor(np.asarray(dataset.y_test), dtype=torch.long)

    # fixed probe sets: n_probe test images spread over the test set; natural photos
    pidx = np.linspace(0, len(x_te) - 1, num=min(o.n_probe, len(x_te))).round().astype(int)
    pidx = np.unique(pidx)
    natural_images = _default_natural(o.size) if o.natural_images is None else o.natural_images
    nat = None
    if natural_images is not False and natural_images is not None and len(natural_images) >= 2:
        nat = to_tensor(np.asarray(natural_images, dtype=np.float32), mean=o.mean, std=o.std)

    # ---- pretrained reference
    s = _Session(
        model=model, head=head, stages=stages, params=params, pstage=pstage,
        stage_params=[[n for n in params if pstage[n] == g] for g in range(G)],
        bn_bufs=[[n for n, _ in model.named_buffers() if (n.endswith("running_mean") or n.endswith("running_var"))
                  and any(n == m or n.startswith(m + ".") for m in stages[g].modules)] for g in range(G)],
        ref={n: p.detach().clone() for n, p in params.items()},
        ref_buf={n: b.detach().clone() for n, b in model.named_buffers()},
        sets={"target": x_te[pidx], "natural": nat}, log=_Log(G), cbs=cbs, bars=bars, handles=handles)
    try:
        conv_name = first_conv(model)[0]
    except ValueError:
        conv_name = None
    s.pre = _measure(s, o)
    probe_before = (drift.stage_probe_accuracy(model, stages, x_tr, dataset.y_train, x_te, dataset.y_test,
                                               batch_size=o.batch_size, seed=o.seed)
                    if o.stage_probe else np.full(G, np.nan))
    s.head_ref = {n: s.ref[n] for n in s.stage_params[G - 1]}  # head measured from its init until unfreeze
    _snapshot(s, o, "pretrained", float("nan"))

    if o.probe:
        _probe_phase(s, o, config, x_tr, y_tr, x_te, y_te)
    if o.recipe != "linear-probe" and int(o.epochs) > 0:
        _finetune_phase(s, o, config, rng, x_tr, y_tr, x_te, y_te)

    # ---- after: per-stage probe, first-layer filters, units for the top-9 figure
    probe_after = (drift.stage_probe_accuracy(model, stages, x_tr, dataset.y_train, x_te, dataset.y_test,
                                              batch_size=o.batch_size, seed=o.seed)
                   if o.stage_probe else np.full(G, np.nan))
    if conv_name is not None:
        fb = s.ref[conv_name + ".weight"].float().numpy()
        fa = params[conv_name + ".weight"].detach().float().cpu().numpy()
        cos = drift.filter_cosine(fb, fa)
    else:
        fb = fa = np.zeros((0, 3, 1, 1), np.float32)
        cos = np.zeros(0)
    units = drift.top9_units(model, stages, s.pre["target"], s.snaps[-1]["meas"]["target"], o.size)
    return _result(s, config, dataset, pidx, conv_name, fb, fa, cos, probe_before, probe_after, units, t_start)


def _measure(s: _Session, o) -> dict:
    return drift.measure_sets(s.model, s.stages, s.sets, batch_size=o.batch_size, cka_pool=o.cka_pool)


def _step_drift(s: _Session) -> np.ndarray:
    """(G,) relative weight change of every stage now (reference norms cached)."""
    G = len(s.stages)
    d = np.full(G, np.nan)
    for g, base in enumerate(s.bases()):
        key = (g, s.unfreeze if g == G - 1 else -2)
        if key not in s.ref_norm:
            s.ref_norm[key] = math.sqrt(drift.sq_norm(list(base.values())))
        d[g] = drift.relative_distance([s.params[n] for n in base], list(base.values()), s.ref_norm[key])
    return d


def _snapshot(s: _Session, o, name: str, acc: float):
    """Record every drift measurement at this point under ``name``."""
    meas = _measure(s, o) if name != "pretrained" else s.pre
    bases = s.bases()
    wc, wa, ws = drift.stage_weight_change(s.params, bases)
    bm, bv = drift.bn_drift(dict(s.model.named_buffers()), s.ref_buf, s.bn_bufs)
    pc = drift.param_change(s.params, {n: t for b in bases for n, t in b.items()}, s.pnames)
    row = {"name": name, "step": s.step, "acc": acc, "wc": wc, "wa": wa, "ws": ws, "bm": bm, "bv": bv,
           "pc": pc, "meas": meas}
    row.update(drift.compare_to_reference(meas, s.pre, len(s.stages)))
    s.snaps.append(row)


def _probe_phase(s: _Session, o, config, x_tr, y_tr, x_te, y_te):
    """Linear probe: the new head alone, fitted on cached pooled features (backbone frozen)."""
    from tqdm.auto import tqdm

    from .state import eval_mode

    model, head, device, bs = s.model, s.head, o.device, o.batch_size

    def head_input(x):
        box = []
        h = head.register_forward_pre_hook(lambda m, a: box.append(a[0].detach().float().cpu()))
        s.handles.append(h)
        try:
            with eval_mode(model), torch.no_grad():
                for b in range(0, len(x), bs):
                    model(x[b:b + bs].to(device))
        finally:
            h.remove()
        return torch.cat(box).reshape(len(x), -1)

    for p in s.params.values():
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
    eval_every = max(1, o.probe_steps // 10)

    def closure():
        opt.zero_grad(set_to_none=True)
        ce = F.cross_entropy(head(f_tr_d), y_tr_d)
        total = ce + 0.5 * o.probe_l2 * head.weight.pow(2).sum()
        total.backward()
        return total

    bar = tqdm(total=o.probe_steps, desc=f"{o.recipe}: linear probe", disable=not o.progress, leave=False)
    s.bars.append(bar)
    prev, acc = None, float("nan")
    for it in range(1, o.probe_steps + 1):
        obj = float(opt.step(closure).detach())
        s.step += 1
        with torch.no_grad():
            out = head(f_tr_d)
            ce = float(F.cross_entropy(out, y_tr_d))
            tr_acc = float((out.argmax(1) == y_tr_d).float().mean())
        s.cbs("batch_end", s.log.add("train", "probe", s.step, 0, len(f_tr), ce, tr_acc))
        if o.track_steps:
            s.step_rows.append((s.step, _step_drift(s)))
        done = prev is not None and abs(prev - obj) <= 1e-7 * max(1.0, abs(obj))
        prev = obj
        if it % eval_every == 0 or done or it == o.probe_steps:
            acc = _eval_head(head, f_te, y_te, bs, device, s.log, s.step, 0, s.cbs)
            bar.set_postfix(loss=f"{ce:.4f}", acc=f"{acc:.3f}")
        bar.update(1)
        if done:
            break
    s.cbs("epoch_end", {"part": "probe", "epoch": 0, "accuracy": acc, "loss": ce, "iterations": it})
    config["probe_iterations"] = it
    bar.close()
    for p in hp:
        p.requires_grad_(False)
    _snapshot(s, o, "probe", acc)


def _stage_lrs(o, G: int) -> dict[int, float]:
    """Learning rate of each stage in the fine-tuning phase (the recipe's rule)."""
    lr, H = o.lr, G - 1
    if o.recipe == "discriminative":
        lo, hi = o.lr_range if o.lr_range is not None else (lr / 100.0, lr)
        if not (0 < lo <= hi):
            raise ValueError(f"lr_range must be (lo, hi) with 0 < lo <= hi, got {o.lr_range!r}")
        return {g: lo * (hi / lo) ** (g / max(G - 1, 1)) for g in range(G)}
    if o.recipe == "full":
        return {g: lr for g in range(G)}
    # lp-ft, freeze-to: the new head at lr, the pretrained stages at backbone_lr
    blr = lr / 5.0 if o.backbone_lr is None else o.backbone_lr
    return {g: (lr if g == H else blr) for g in range(G)}


def _optimizer(s: _Session, o, config) -> torch.optim.Optimizer:
    """Unfreeze the trainable stages; one parameter group per stage at its learning rate."""
    G = len(s.stages)
    n_frozen = o.freeze_to if o.recipe == "freeze-to" else 0
    trainable = [g for g in range(G) if g >= min(n_frozen, G - 1)]
    glr = _stage_lrs(o, G)
    groups = []
    for g in trainable:
        ps = [s.params[n] for n in s.stage_params[g]]
        for p in ps:
            p.requires_grad_(True)
        if ps:
            groups.append({"params": ps, "lr": glr[g], "name": s.stages[g].name})
    config["stage_lr"] = {s.stages[g].name: (glr[g] if g in trainable else 0.0) for g in range(G)}
    if o.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    for grp in opt.param_groups:
        grp["base_lr"] = grp["lr"]
    return opt


def _finetune_phase(s: _Session, o, config, rng, x_tr, y_tr, x_te, y_te):
    """Fine-tuning: warm-up then cosine/constant schedule, a snapshot after every epoch."""
    from tqdm.auto import tqdm

    model, device, bs, ft_epochs = s.model, o.device, o.batch_size, int(o.epochs)
    opt = _optimizer(s, o, config)
    n_total = ft_epochs * math.ceil(len(x_tr) / bs)
    n_warm = int(round(o.warmup * n_total))

    def lr_factor(t):  # t = 1 .. n_total
        if t <= n_warm:
            return t / n_warm
        if o.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (t - n_warm) / (n_total - n_warm + 1)))

    ft_step = 0
    s.unfreeze = s.step
    s.head_ref = {n: s.params[n].detach().clone() for n in s.stage_params[len(s.stages) - 1]}
    act: dict[int, tuple[float, float]] = {}

    def stat_hook(g):
        def hook(m, i, out):
            if torch.is_tensor(out):
                od = out.detach()
                act[g] = (float(od.float().mean()), float(od.float().std()))
        return hook

    mods = dict(model.named_modules())
    for g, st in enumerate(s.stages):
        s.handles.append(mods[st.output].register_forward_hook(stat_hook(g)))

    for ep in range(1, ft_epochs + 1):
        model.train()
        if o.bn == "frozen":
            for m in model.modules():
                if isinstance(m, _BN):
                    m.eval()
        perm = torch.from_numpy(rng.permutation(len(x_tr)))
        nb = math.ceil(len(perm) / bs)
        bar = tqdm(total=nb, desc=f"{o.recipe}: epoch {ep}/{ft_epochs}", disable=not o.progress, leave=False)
        s.bars.append(bar)
        for b in range(0, len(perm), bs):
            idx = perm[b:b + bs]
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
            s.step += 1
            rec = s.log.add("train", "finetune", s.step, ep, len(idx), loss.item(),
                            float((out.argmax(1) == yb).float().mean()), dict(act))
            s.cbs("batch_end", rec)
            if o.track_steps:
                s.step_rows.append((s.step, _step_drift(s)))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        acc = _eval_model(model, x_te, y_te, bs, device, s.log, s.step, ep, s.cbs, act)
        s.cbs("epoch_end", {"part": "finetune", "epoch": ep, "accuracy": acc, "model": model})
        _snapshot(s, o, f"epoch{ep}", acc)
    for h in s.handles:
        h.remove()
    s.handles.clear()
    model.eval()


def _result(s: _Session, config, dataset, pidx, conv_name, fb, fa, cos, probe_before, probe_after, units,
            t_start) -> FinetuneResult:
    G, snaps, rows = len(s.stages), s.snaps, s.log.rows

    def arr(key):
        return np.array([r[key] for r in snaps], dtype=np.float64)

    def units_arr(key, *shape):
        return np.array(units[key], dtype=np.int64).reshape(len(units[key]), *shape)

    return FinetuneResult(
        config=config,
        stages=tuple(st.name for st in s.stages),
        classes=tuple(dataset.classes),
        snapshots=tuple(r["name"] for r in snaps),
        snapshot_step=np.array([r["step"] for r in snaps], dtype=np.int64),
        unfreeze_step=int(s.unfreeze),
        weight_change=arr("wc"), weight_angle=arr("wa"), weight_scale=arr("ws"),
        bn_mean_drift=arr("bm"), bn_var_drift=arr("bv"),
        cka_target=arr("cka_target"), cka_natural=arr("cka_natural"),
        topk_overlap_target=arr("ov_target"), topk_overlap_natural=arr("ov_natural"),
        accuracy=np.array([r["acc"] for r in snaps], dtype=np.float64),
        param_names=s.pnames, param_stage=np.array([s.pstage[n] for n in s.pnames], dtype=np.int64),
        param_change=arr("pc"),
        first_conv=conv_name or "",
        filters_before=fb, filters_after=fa, filter_cosine=np.asarray(cos, dtype=np.float64),
        stage_probe_before=np.asarray(probe_before, dtype=np.float64),
        stage_probe_after=np.asarray(probe_after, dtype=np.float64),
        step=np.array([r[0] for r in s.step_rows], dtype=np.int64),
        step_drift=np.array([r[1] for r in s.step_rows], dtype=np.float64).reshape(len(s.step_rows), G),
        log_phase=tuple(r[0] for r in rows), log_part=tuple(r[1] for r in rows),
        log_step=np.array([r[2] for r in rows], dtype=np.int64),
        log_epoch=np.array([r[3] for r in rows], dtype=np.int64),
        log_size=np.array([r[4] for r in rows], dtype=np.int64),
        log_loss=np.array([r[5] for r in rows], dtype=np.float64),
        log_accuracy=np.array([r[6] for r in rows], dtype=np.float64),
        log_act_mean=np.array([r[7] for r in rows], dtype=np.float64).reshape(len(rows), G),
        log_act_std=np.array([r[8] for r in rows], dtype=np.float64).reshape(len(rows), G),
        unit_stage=tuple(units["stage"]), unit_channel=np.array(units["channel"], dtype=np.int64),
        unit_before=units_arr("before", -1), unit_after=units_arr("after", -1),
        unit_before_box=units_arr("before_box", -1, 4), unit_after_box=units_arr("after_box", -1, 4),
        probe_images=(np.clip(np.asarray(dataset.x_test)[pidx], 0, 1) * 255).round().astype(np.uint8),
        runtime_s=time.time() - t_start,
        model=s.model,
    )


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
