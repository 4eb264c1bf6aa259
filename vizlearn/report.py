"""``vizlearn report``: the Zeiler & Fergus picture of a model, written to a folder.

What it does, in order (each step uses the public API):

1. load the model (:func:`vizlearn.load_model`) and the photos (built-in sample photos, or a
   folder); build the image set: each photo resized to the model's input plus ``crops - 1``
   random crops, so that a handful of photos still gives many candidate patches;
2. pick ~5 layers spread from shallow to deep (:func:`default_layers`) unless given;
3. one streaming pass of :func:`vizlearn.top_k` over the image set for all layers;
4. per layer, choose ``filters`` channels by the documented rule: **the channels with the
   strongest top-1 activation** (dead channels, whose best score is <= 0, are never chosen);
5. project each chosen channel's top-k activations to pixel space (deconvnet and guided
   backpropagation, :func:`vizlearn.project_units`), crop the projections and the photo around
   the unit to its effective receptive field (:func:`vizlearn.features.feature_tiles`), and draw
   the Fig.-2-style panel;
6. first-layer filters, activation maps of one photo, top-5 predictions per photo, optional
   experiments (occlusion, ...);
7. write PNGs, ``index.html`` (all figures with captions), ``results.json`` and ``results.npz``.

This module and :mod:`vizlearn.cli` are the only places that write files.
"""
from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .features import choose_filters, default_layers, feature_tiles, first_conv
from .images import image_set, load_folder, sample_photos, to_tensor
from .layer1 import layer1_health
from .layers import resolve_layer, unwrap_model
from .models import LoadedModel, load_model, predict
from .projection import METHODS
from .receptive_field import receptive_field
from .topk import top_k

__all__ = ["run_report", "run_sanity", "run_experiments", "Figures", "EXPERIMENTS", "DEFAULT_EXPERIMENTS"]

DEFAULT_EXPERIMENTS = ("occlusion", "sanity", "layer1")  # the cheap ones; see EXPERIMENTS for all

@dataclass
class Figures:
    """What a report wrote: (file name, caption) per figure, in page order."""

    out: Path
    items: list = field(default_factory=list)

    def save(self, fig, name: str, caption: str) -> None:
        fig.savefig(self.out / name, dpi=110)
        self.items.append((name, caption))

    def write_index(self, title: str, summary: str, name: str = "index.html") -> Path:
        parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
                 "figure{margin:2em 0}figcaption{color:#333}</style>",
                 f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>"]
        for file, caption in self.items:
            parts.append(f"<figure><img src='{html.escape(file)}'><figcaption>{html.escape(caption)}"
                         "</figcaption></figure>")
        path = self.out / name
        path.write_text("\n".join(parts), encoding="utf-8")
        return path


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def run_report(*, model: str | nn.Module | LoadedModel = "efficientnet_lite0", weights="DEFAULT",
               images: str | Path | None = None, layers: Sequence[str] | None = None, k: int = 9,
               filters: int = 8, crops: int = 8, out: str | Path = "figures", device: str = "cpu",
               seed: int = 0, experiments: Sequence[str] = DEFAULT_EXPERIMENTS,
               methods: Sequence[str] = ("deconvnet", "guided"), quiet: bool = False, progress: bool = True) -> dict:
    """Run the whole report; returns the summary dict also written to ``results.json``."""
    from . import plot

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if filters < 1:
        raise ValueError(f"filters must be at least 1, got {filters}")
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods}")
    _check_experiments(experiments)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeds random weights (weights=None), caller's RNG untouched
        torch.manual_seed(seed)
        loaded = _load(model, weights, device)
    layers = list(layers) if layers else default_layers(loaded, input_size=loaded.input_size,
                                                          in_channels=len(loaded.mean))
    for name in layers:
        resolve_layer(loaded, name)  # fail early on a typo, before any work
    if images is None:
        photos, skipped = sample_photos(), []
    else:
        photos, skipped = load_folder(images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = Figures(out)
    iset = image_set(photos, size=loaded.input_size, crops=crops, seed=seed)
    _progress(f"model {loaded.name}: {len(photos)} photos -> {len(iset.names)} images; layers {layers}", quiet)

    # 1. first-layer filters
    stem_name, stem = first_conv(loaded)
    weights_np = stem.weight.detach().cpu().numpy()
    dead = layer1_health(weights_np).dead
    n_dead = int(dead.sum())
    figs.save(plot.filter_grid(weights_np, dead=dead, ncols=8, title=f"{loaded.name}: {stem_name} filters"),
              "layer1_filters.png",
              f"The {len(weights_np)} filters of the first layer ({stem_name}, {weights_np.shape[2]}x"
              f"{weights_np.shape[3]}, RGB), each stretched to its own range; red frames mark the {n_dead} dead "
              "(all-zero) filters.")

    # 2. streaming top-k over the image set
    batch = to_tensor(iset.images, mean=loaded.mean, std=loaded.std)
    results = top_k(loaded, batch, layers, k=k, batch_size=16, device=device, progress=progress)

    # 3. Fig.-2 panels
    summary_layers = {}
    npz = {"image_names": np.array(iset.names), "photo_index": iset.photo_index}
    for li, layer in enumerate(layers):
        res = results[resolve_layer(loaded, layer).key]
        chosen = choose_filters(res, filters)
        _progress(f"[{li + 1}/{len(layers)}] projecting {len(chosen)}x{k} units of {layer}", quiet)
        tiles = {}
        crop = "effective"
        for method in methods:
            t = feature_tiles(loaded, iset, layer, res, chosen, method=method, crop=crop, batch=batch)
            tiles[method], patches, crop = t.projections, t.patches, t.side  # later methods reuse the crop
        field_ = receptive_field(loaded, layer, input_size=loaded.input_size, in_channels=len(loaded.mean))
        labels = [f"ch {c}, max {res.scores[c, 0]:.1f}" for c in chosen]
        fname = f"features_{li + 1}_{layer.replace('.', '_').replace(':', '_')}.png"
        figs.save(plot.feature_panel(tiles, patches, labels=labels, per_row=2,
                                     title=f"{loaded.name} {layer}: top-{k} activations of {len(chosen)} filters"),
                  fname,
                  f"Layer {layer} (theoretical receptive field {field_.size[0]}x{field_.size[1]} px, stride "
                  f"{field_.jump[0]}): for the {len(chosen)} channels with the strongest top-1 activation, the "
                  f"{' and '.join(methods)} projections of their top-{k} activations beside the image patches that "
                  f"caused them, all cut around the unit's centre to a {crop}x{crop} px square: the effective "
                  "receptive field (the square holding 90% of the projection's magnitude, median over the panel). "
                  "Checkerboard = outside the image; grey = zero.")
        summary_layers[layer] = {
            "channels": chosen.tolist(), "receptive_field": {"size": list(field_.size), "jump": list(field_.jump),
                                                              "start": list(field_.start)},
            "crop_side": int(crop), "methods": list(methods),
            "scores": res.scores[chosen].tolist(), "image_index": res.image_index[chosen].tolist(),
            "position": res.position[chosen].tolist(), "box": res.box[chosen].tolist(), "figure": fname}
        key = f"L{li}"
        npz.update({f"{key}_scores": res.scores, f"{key}_image_index": res.image_index,
                    f"{key}_position": res.position, f"{key}_box": res.box, f"{key}_channels": chosen,
                    f"{key}_patch_tiles": _to_uint8(patches)})
        npz.update({f"{key}_{method}_tiles": _to_uint8(arr) for method, arr in tiles.items()})

    # 4. activation maps of one photo
    names = [n for n, _ in photos]
    probe = names.index("chelsea") if "chelsea" in names else 0
    probe_img = int(np.flatnonzero(iset.photo_index == probe)[0])
    from .capture import capture
    from .state import analysis_mode

    net = unwrap_model(loaded)
    with analysis_mode(net), torch.no_grad(), capture(net, layers) as acts:
        net(batch[probe_img:probe_img + 1].to(device))
    maps = {name: acts[name][0].float().cpu().numpy() for name in layers}
    figs.save(plot.activation_maps(iset.images[probe_img], maps), "activation_maps.png",
              f"Activation maps of the photo '{names[probe]}' at each layer: the 8 most active channels per row "
              "(own colour scale each). Early maps follow edges and colours; deep maps are coarse and respond to "
              "object parts.")

    # 5. predictions
    whole = [int(np.flatnonzero(iset.photo_index == i)[0]) for i in range(len(photos))]
    preds = predict(loaded, iset.images[whole], top=5)
    figs.save(plot.predictions([iset.images[i] for i in whole], preds, names=names), "predictions.png",
              "Top-5 ImageNet predictions of the model for each photo.")

    # 6. experiments
    exp_summary = _run_experiments(experiments, loaded, photos, out, figs, quiet=quiet)

    elapsed = time.perf_counter() - t0
    summary = {
        "model": loaded.name, "input_size": loaded.input_size, "layers": layers, "k": k, "seed": seed,
        "photos": names, "skipped_files": list(skipped), "n_images": len(iset.names),
        "image_names": list(iset.names), "first_layer": {"name": stem_name, "dead_filters": n_dead},
        "feature_panels": summary_layers,
        "predictions": {names[i]: [[lab, float(p)] for lab, p in preds[i]] for i in range(len(names))},
        "experiments": exp_summary, "seconds": round(elapsed, 1),
        "figures": [{"file": f, "caption": c} for f, c in figs.items],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    np.savez_compressed(out / "results.npz", **npz)
    figs.write_index(f"vizlearn report: {loaded.name}",
                     f"{len(photos)} photos ({len(iset.names)} images with crops), layers {', '.join(layers)}; "
                     f"top-{k}; {len(skipped)} files skipped; {elapsed:.0f} s.")
    _progress(f"wrote {len(figs.items)} figures, index.html, results.json and results.npz to {out} "
              f"in {elapsed:.0f} s" + (f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""), quiet)
    return summary


def _to_uint8(tiles: np.ndarray) -> np.ndarray:
    """Tiles in [0, 1] with NaN padding -> uint8 with 255 in a 4th (alpha) channel where valid."""
    valid = ~np.isnan(tiles).any(axis=-1, keepdims=True)
    rgb = np.round(np.nan_to_num(tiles, nan=0.0) * 255).astype(np.uint8)
    return np.concatenate([rgb, (valid * 255).astype(np.uint8)], axis=-1)


def _check_experiments(experiments: Sequence[str]) -> None:
    unknown = [name for name in experiments if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; choose from {sorted(EXPERIMENTS)}")


def _run_experiments(experiments: Sequence[str], loaded: LoadedModel, photos, out: Path, figs: Figures, *,
                     quiet: bool) -> dict:
    _check_experiments(experiments)
    done = {}
    for name in experiments:
        _progress(f"experiment: {name}", quiet)
        done[name] = EXPERIMENTS[name](loaded, photos, out, figs)
    return done


def _pick(photos, names=("chelsea", "coffee")):
    chosen = [p for p in photos if p[0] in names]
    return chosen or list(photos[:2])


def _exp_occlusion(loaded, photos, out: Path, figs: Figures) -> dict:
    from .occlusion import run_occlusion

    results = run_occlusion(loaded, _pick(photos), out / "experiments")
    names = loaded.categories or ()
    label = (lambda i: names[i] if names else str(i))
    figs.items.append(("experiments/occlusion.png",
                       "Occlusion sensitivity (paper Fig. 7): a grey square slides over each photo. Per row: the "
                       "photo with one occluder, the total activity of the feature map strongest on the "
                       f"unoccluded photo (layer {results[0].layer}), that map's projection, P(correct class) and "
                       "the most probable label per occluder position. The class probability collapses where "
                       "the object is covered, not where the background is."))
    return {"layer": results[0].layer, "photos": [
        {"target": label(r.target), "base_prob": round(float(r.base_prob), 4),
         "min_prob": round(float(np.nanmin(r.prob)), 4)} for r in results]}


def _exp_invariance(loaded, photos, out: Path, figs: Figures) -> dict:
    from .invariance import run_invariance

    result = run_invariance(loaded, _pick(photos, ("chelsea", "coffee", "motorcycle")), out / "experiments")
    figs.items.append(("experiments/invariance.png",
                       "Invariance (paper Fig. 5): vertical translation, scale and rotation of the photos; "
                       "normalised Euclidean distance between the original and transformed feature vectors at a "
                       "shallow and a deep layer, and P(original top-1 class)."))
    return {"layers": list(result.layers)}


def _exp_correspondence(loaded, photos, out: Path, figs: Figures) -> dict:
    from .correspondence import run_correspondence

    run_correspondence(loaded, out / "experiments")
    figs.items.append(("experiments/correspondence.png",
                       "Correspondence (paper Table 1): the same part (eyes, nose) masked in several views of the "
                       "cat versus random boxes; Hamming-based consistency per layer, lower = more consistent."))
    return {}


def _exp_layer1(loaded, photos, out: Path, figs: Figures) -> dict:
    from .layer1 import run_layer1

    health = run_layer1(loaded, out / "experiments")
    figs.items.append(("experiments/layer1_health.png",
                       "Layer-1 health (paper Fig. 6): RMS of each first-layer filter with dead and dominant "
                       "filters flagged, and the share of each filter's energy in low/mid/high spatial "
                       "frequencies."))
    return health.summary()


def _exp_evolution(loaded, photos, out: Path, figs: Figures) -> dict:
    from .evolution import run_evolution

    run_evolution(out / "experiments")
    figs.items.append(("experiments/evolution.png",
                       "Feature evolution (paper Fig. 4): a small CNN trained from scratch on scikit-learn digits; "
                       "for tracked units of each layer, the strongest activation's projection at epochs 1, 2, 5, "
                       "10, 20, 30, 40, 64. Lower layers settle first."))
    return {}


def _exp_sanity(loaded, photos, out: Path, figs: Figures) -> dict:
    summary = run_sanity(model=loaded, out=out / "experiments")
    figs.items.append(("experiments/sanity.png",
                       f"Sanity check (Adebayo et al. 2018) of the projections of layer {summary['layer']}: the "
                       "layers are re-initialised from the top down, one step at a time; SSIM and rank correlation "
                       "between the original and the randomised projections. A method that falls quickly depends on "
                       "the trained weights; one that stays high is mostly showing the image or the architecture."))
    return summary


EXPERIMENTS: dict = {"occlusion": _exp_occlusion, "sanity": _exp_sanity, "invariance": _exp_invariance,
                     "correspondence": _exp_correspondence, "layer1": _exp_layer1, "evolution": _exp_evolution}


def run_experiments(names: Sequence[str], *, model="efficientnet_lite0", weights="DEFAULT",
                    images: str | Path | None = None, out: str | Path = "figures/experiments",
                    device: str = "cpu") -> dict:
    """``vizlearn experiments``: run the named experiments alone; figures and numbers go to ``out/experiments``,
    a page to ``out/experiments.html`` and the summary to ``out/experiments.json`` (the report's
    ``index.html`` in the same folder is left alone)."""
    _check_experiments(names)
    loaded = _load(model, weights, device)
    photos = sample_photos() if images is None else load_folder(images)[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = Figures(out)
    done = _run_experiments(names, loaded, photos, out, figs, quiet=False)
    (out / "experiments.json").write_text(json.dumps(done, indent=1, default=float), encoding="utf-8")
    figs.write_index(f"vizlearn experiments: {loaded.name}", ", ".join(names), name="experiments.html")
    return done


def _load(model, weights, device) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, weights=weights, device=device)


def run_sanity(*, model="efficientnet_lite0", weights="DEFAULT", layer: str | None = None, method: str = "deconvnet",
               photos: Sequence[str] = ("chelsea", "coffee", "motorcycle"), out: str | Path = "figures",
               device: str = "cpu", seed: int = 0) -> dict:
    """``vizlearn sanity``: cascading-randomisation check of the projections; writes ``sanity.png/.npz/.json``.

    ``layer`` defaults to the middle one of :func:`default_layers`; the projected channel is the one
    with the largest mean spatial-max activation over the photos.
    """
    from . import plot
    from .sanity import sanity_check

    loaded = _load(model, weights, device)
    layer = layer or default_layers(loaded, input_size=loaded.input_size)[2]
    resolve_layer(loaded, layer)
    chosen = [p for p in sample_photos() if p[0] in photos]
    iset = image_set(chosen, size=loaded.input_size, crops=1, seed=seed)
    x = to_tensor(iset.images, mean=loaded.mean, std=loaded.std)
    result = sanity_check(loaded, x, layer, method=method, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "sanity")
    fig = plot.plot_sanity(result)
    fig.savefig(out / "sanity.png", dpi=110)
    summary = {"layer": layer, "channel": int(result.channel), "method": method, "steps": list(result.steps),
               "ssim_mean": np.asarray(result.ssim).mean(axis=1).round(4).tolist(),
               "spearman_mean": np.asarray(result.spearman).mean(axis=1).round(4).tolist()}
    print(f"sanity check of {loaded.name} {layer} ch {result.channel} ({method}): mean SSIM per step "
          f"{summary['ssim_mean']}; wrote {out / 'sanity.png'}")
    return summary
