"""``vizlearn finetune``: fine-tune the pretrained model on a small data set and show what moved.

:func:`run_finetune_report` runs, on one data set with one seed:

1. the default recipe ``lp-ft`` (linear probe to convergence, then everything: backbone at lr/5,
   head at lr 1e-3, AdamW, weight decay 0.01, BN statistics frozen), with per-stage linear probes
   before/after;
2. the ``full`` control (new head and every layer at one learning rate from the start) and
   ``discriminative`` (stage learning rates from lr/100 at the stem to lr at the head) for the
   recipe comparison;
3. ``lp-ft`` again with BatchNorm statistics updating (train-mode BN), for the pitfall panel;

and writes into ``out_dir``: the eight PNG figures, ``index.html`` with captions, and every
number as JSON/CSV/npz (one sub-folder per run, written by ``FinetuneResult.save``) plus a
``summary.json``/``summary.csv`` across runs. Time on an idle 2-core CPU: 164 s measured for the
default (``quick=True``: one epoch, lp-ft and full only).
"""
from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["run_finetune_report", "redraw_finetune_report"]


def run_finetune_report(out_dir="figures/finetune", *, model="efficientnet_lite0", weights="DEFAULT",
                        dataset="digits", recipes: Sequence[str] = ("lp-ft", "full", "discriminative"),
                        bn_update: bool = True, epochs: int = 3, lr: float = 1e-3, size: int = 64,
                        batch_size: int = 64, seed: int = 0, device: str = "cpu", quick: bool = False,
                        progress: bool = True):
    """Run the fine-tuning experiment and write figures + numbers into ``out_dir``.

    Options
    -------
    model : model name or ``nn.Module`` / LoadedModel (default: bundled efficientnet_lite0).
    weights : passed to :func:`vizlearn.models.load_model` when ``model`` is a name.
    dataset : ``"digits"`` (default), ``"lfw"``, or a folder with one sub-folder per class.
    recipes : recipes for the comparison; the first is the main run (figures 1-5, 8).
    bn_update : also run the main recipe with BN statistics updating (pitfall panel).
    epochs, lr, size, batch_size, seed, device : as in :func:`vizlearn.finetune.finetune`.
    quick : smoke run -- 1 epoch, recipes lp-ft and full, no BN variant, no per-stage probes.
    progress : tqdm bars and one line per step.

    Returns ``{label: FinetuneResult}``.
    """
    from .datasets import load_dataset
    from .finetune import finetune
    from .models import LoadedModel, load_model

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights=weights, device=device)
    ds = load_dataset(dataset, size, seed=seed)
    if quick:
        epochs, recipes, bn_update = 1, ("lp-ft", "full"), False
    recipes = list(dict.fromkeys(recipes))
    if not recipes:
        raise ValueError("recipes must name at least one recipe")

    def say(msg):
        if progress:
            print(msg, flush=True)

    say(f"fine-tuning {loaded.name} on {ds!r}; recipes {recipes}{' + BN-update variant' if bn_update else ''}")
    runs = {}
    for i, rec in enumerate(recipes):
        t = time.time()
        runs[rec] = finetune(loaded, ds, recipe=rec, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                             device=device, progress=progress, stage_probe=(i == 0 and not quick))
        say(f"  {rec}: test accuracy {runs[rec].accuracy[-1]:.3f} ({time.time() - t:.0f} s)")
    main = recipes[0]
    if bn_update:
        t = time.time()
        label = f"{main} (BN stats updating)"
        runs[label] = finetune(loaded, ds, recipe=main, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                               device=device, progress=progress, stage_probe=False, bn="update")
        say(f"  {label}: test accuracy {runs[label].accuracy[-1]:.3f} ({time.time() - t:.0f} s)")

    labels = {}
    for label, r in runs.items():
        labels[label] = label.replace(" ", "_").replace("(", "").replace(")", "")
        r.save(out / "results" / labels[label])
    _write_summary(runs, out)
    meta = dict(model=loaded.name, dataset=ds.name, n_train=int(len(ds.y_train)), n_test=int(len(ds.y_test)),
                size=int(size), seed=int(seed), epochs=int(epochs), main=main, recipes=recipes,
                bn_label=f"{main} (BN stats updating)" if bn_update else None, runs=labels,
                total_s=round(time.time() - t0, 1))
    (out / "report.json").write_text(json.dumps(meta, indent=1))
    n = _write_figures(runs, out, meta)
    say(f"wrote {n} figures, index.html and results to {out} in {time.time() - t0:.0f} s")
    return runs


def redraw_finetune_report(out_dir="figures/finetune"):
    """Redraw the figures and index.html of a finished run from its saved numbers (no model)."""
    from .finetune import FinetuneResult

    out = Path(out_dir)
    if not (out / "report.json").is_file():
        raise ValueError(f"{str(out)!r} holds no report.json written by run_finetune_report")
    meta = json.loads((out / "report.json").read_text())
    runs = {label: FinetuneResult.load(out / "results" / sub) for label, sub in meta["runs"].items()}
    return _write_figures(runs, out, meta)


def _write_figures(runs, out: Path, meta: dict) -> int:
    from . import plot_finetune as pf
    from .report import Figures

    main, recipes, epochs, dname = meta["main"], meta["recipes"], meta["epochs"], meta["dataset"]
    r = runs[main]
    figs = Figures(out)
    first = r.param(r.first_conv + ".weight") if r.first_conv else float("nan")
    last_conv = r.stages[-2]
    li = r.stage_index(last_conv)
    mid = r.stages[(len(r.stages) - 1) // 2]
    figs.save(pf.drift_profile(runs), "drift_profile.png",
              f"Relative weight change ||W-W0||/||W0|| per stage after {epochs} epoch(s) on {dname}, log scale. "
              f"Main recipe {main}: first conv {100 * first:.2f}%, {last_conv} {100 * r.weight_change[-1, li]:.2f}%. "
              "The head (hollow) starts from scratch and is measured from the unfreeze point.")
    figs.save(pf.cka_profile(r), "cka_profile.png",
              f"Linear CKA between pretrained and fine-tuned activations at each stage ({main}), on held-out target "
              "images and on natural photos (float64, centred, flattened maps). 1 = same representation up to "
              f"rotation and scale. Stem {r.cka_target[-1, 0]:.3f}, {mid} {r.cka_target[-1, r.stage_index(mid)]:.3f}, "
              f"{last_conv} {r.cka_target[-1, li]:.3f} on {dname}.")
    figs.save(pf.first_layer_filters(r), "first_layer_filters.png",
              "First-layer filters before and after fine-tuning (same colour scale per filter) and their difference "
              "amplified; bottom: 1 - cosine per filter. All-zero filters of the checkpoint are masked.")
    figs.save(pf.drift_over_steps(r), "drift_over_steps.png",
              "Relative weight change of every stage after each optimisation step (log scale) and test accuracy. "
              "Left: the linear probe (backbone frozen, only the head moves); right: after unfreezing.")
    if len(r.unit_stage):
        figs.save(pf.topk_before_after(r), "topk_before_after.png",
                  "The same units before and after fine-tuning: their nine strongest held-out target images "
                  "(per image the spatial max; one entry per image). Units: the most selective stem unit whose "
                  "maxima lie inside the image, and the most selective unit of the last conv layer.")
    bn_label = meta.get("bn_label")
    if bn_label and bn_label in runs:
        figs.save(pf.bn_pitfall(r, runs[bn_label]), "bn_pitfall.png",
                  "The BatchNorm pitfall: the same fine-tuning with BN running statistics frozen (eval-mode BN) vs "
                  f"updating on the small target batches (accuracy {r.accuracy[-1]:.3f} vs "
                  f"{runs[bn_label].accuracy[-1]:.3f}); right: how far the running statistics moved.")
    if len(recipes) > 1:
        figs.save(pf.recipe_comparison({k: runs[k] for k in recipes}), "recipe_comparison.png",
                  "Recipes compared at the same seed and epochs: weight change per stage (top, log) and CKA to the "
                  "pretrained network (bottom). full = one learning rate everywhere from the start (the control).")
    if np.isfinite(r.stage_probe_after).any():
        figs.save(pf.stage_probe_accuracy(r), "stage_probe_accuracy.png",
                  "Logistic regression on global-average-pooled outputs of each stage, test accuracy before "
                  "(ImageNet features) and after fine-tuning (Zeiler & Fergus 2014, Table 7 style).")
    summary = (f"{meta['model']} fine-tuned on {dname} ({meta['n_train']} train / {meta['n_test']} test, "
               f"{meta['size']} px), seed {meta['seed']}, {epochs} epoch(s). "
               + "; ".join(f"{k}: accuracy {v.accuracy[-1]:.3f}" for k, v in runs.items())
               + f". Total time {meta['total_s']:.0f} s. Numbers: results/*/ (JSON, CSV, npz), summary.csv.")
    figs.write_index(f"vizlearn finetune: {meta['model']} on {dname}", summary)
    return len(figs.items)


def _write_summary(runs, out: Path) -> None:
    rows = []
    for label, r in runs.items():
        for gi, st in enumerate(r.stages):
            rows.append({"run": label, "stage": st, "weight_change": float(r.weight_change[-1, gi]),
                         "cka_target": float(r.cka_target[-1, gi]), "cka_natural": float(r.cka_natural[-1, gi]),
                         "topk_overlap_target": float(r.topk_overlap_target[-1, gi]),
                         "bn_mean_drift": float(r.bn_mean_drift[-1, gi]), "accuracy": float(r.accuracy[-1]),
                         "runtime_s": float(r.runtime_s)})
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    js = {label: {"accuracy": float(r.accuracy[-1]), "runtime_s": float(r.runtime_s),
                  "first_conv_change": r.param(r.first_conv + ".weight") if r.first_conv else None,
                  "stages": list(r.stages),
                  "weight_change": [None if not np.isfinite(v) else float(v) for v in r.weight_change[-1]],
                  "cka_target": [None if not np.isfinite(v) else float(v) for v in r.cka_target[-1]],
                  "cka_natural": [None if not np.isfinite(v) else float(v) for v in r.cka_natural[-1]],
                  "config": r.config} for label, r in runs.items()}
    (out / "summary.json").write_text(json.dumps(js, indent=1))
