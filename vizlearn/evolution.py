"""Feature evolution during training (Zeiler & Fergus 2014, Fig. 4).

:class:`FeatureEvolution` is a training callback. Call ``cb.on_epoch_end(model, epoch)`` after
each epoch (1-based: ``epoch=1`` is "after the first epoch"; include 0 in ``epochs`` and call it
before training to record the initialisation). At the chosen epochs it

* re-finds, for each tracked unit ``(layer, channel)``, its strongest activation over the fixed
  probe set (per image the spatial max; the best image; ties -> lower index, first position);
* stores that activation's deconvnet projection (:func:`vizlearn.projection.project_units`) and
  the input box of the unit's receptive field (:mod:`vizlearn.receptive_field` when present,
  else the bounding box of the projection's support), from which the image patch is cut;
* keeps the linear-kernel Gram matrix of each layer's probe features, so that the similarity of
  a layer's representation between epochs (linear CKA) can be measured: a layer has *settled*
  when its CKA to the final epoch stays near 1.

It works in a plain PyTorch loop and as a ``callbacks=[cb]`` entry of ``vizlearn.finetune``; the
model is left as found (eval mode / out-of-place rectifiers only while recording).
:func:`train_small_cnn_demo` trains a small CNN from scratch on scikit-learn digits and records it.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .capture import capture
from ._results import load_dataclass, save_dataclass
from .layers import module_device, resolve_layer, unwrap_model
from .state import analysis_mode

__all__ = ["FeatureEvolution", "EvolutionResult", "linear_cka_gram", "train_small_cnn_demo", "run_evolution",
           "PAPER_EPOCHS"]

PAPER_EPOCHS = (1, 2, 5, 10, 20, 30, 40, 64)


def linear_cka_gram(k: np.ndarray, l: np.ndarray) -> float:
    """Linear CKA from two (N, N) Gram matrices ``X X^T`` and ``Y Y^T`` (float64, centred here)."""
    from .similarity import cka_from_grams

    k, l = np.asarray(k, dtype=np.float64), np.asarray(l, dtype=np.float64)
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return cka_from_grams(h @ k @ h, h @ l @ h)


@dataclass(frozen=True)
class EvolutionResult:
    """Recorded snapshots: E epochs, U tracked units, L layers, N probe images."""

    epochs: np.ndarray  # (E,) int64 recorded epochs
    layers: tuple  # (L,) layer keys
    unit_layer: tuple  # (U,) layer key of each unit
    unit_channel: np.ndarray  # (U,) int64
    image_index: np.ndarray  # (E, U) int64 probe image with the strongest activation
    position: np.ndarray  # (E, U, 2) int64 (row, col) in the feature map
    score: np.ndarray  # (E, U) float32 that activation
    box: np.ndarray  # (E, U, 4) int64 (y0, x0, y1, x1) input box (receptive field), clipped
    projection: np.ndarray  # (E, U, C, H, W) float32 deconvnet projection of that activation
    probe: np.ndarray  # (N, H, W, C) float32 probe images for display, [0, 1]
    gram: np.ndarray  # (E, L, N, N) float32 Gram matrices of the flattened layer features (computed in float64)
    weight_layer: tuple = ()  # (L,) name of the module whose weight is tracked for each layer ('' = none)
    weight_change: np.ndarray | None = None  # (E, L) ||W_e - W_last|| / ||W_last - W_first|| (NaN: none)
    extra: dict | None = None  # e.g. training log {"loss": (T,), "accuracy": (T,)}

    def cka(self) -> np.ndarray:
        """(L, E, E) linear CKA between the recorded epochs, per layer."""
        e, nl = len(self.epochs), len(self.layers)
        out = np.ones((nl, e, e))
        for li in range(nl):
            for i in range(e):
                for j in range(i + 1, e):
                    out[li, i, j] = out[li, j, i] = linear_cka_gram(self.gram[i, li], self.gram[j, li])
        return out

    def settle(self, threshold: float = 0.995) -> dict:
        """Per layer: CKA to the final epoch at every recorded epoch, CKA between consecutive
        recorded epochs, the first epoch from which CKA-to-final stays >= ``threshold``; the
        weight distance to the final weights as a share of the whole training path
        (``||W_e - W_last|| / ||W_last - W_first||``) and the first epoch from which it stays
        <= ``1 - threshold``; the mean cosine similarity of each unit's projection between
        consecutive recorded epochs."""
        c = self.cka()
        out = {}
        for li, ly in enumerate(self.layers):
            to_final = c[li, :, -1]
            ok = to_final >= threshold
            first = next((int(self.epochs[i]) for i in range(len(ok)) if ok[i:].all()), None)
            units = [u for u, name in enumerate(self.unit_layer) if name == ly]
            sims = []
            for i in range(len(self.epochs) - 1):
                s = []
                for u in units:
                    a, b = self.projection[i, u].ravel(), self.projection[i + 1, u].ravel()
                    den = np.linalg.norm(a) * np.linalg.norm(b)
                    s.append(float(a @ b / den) if den > 0 else np.nan)
                sims.append(float(np.nanmean(s)) if s and not np.isnan(s).all() else float("nan"))
            wc = (self.weight_change[:, li] if self.weight_change is not None
                  else np.full(len(self.epochs), np.nan))
            w_first = next((int(self.epochs[i]) for i in range(len(wc)) if (wc[i:] <= 1 - threshold).all()), None)
            out[ly] = {"cka_to_final": np.round(to_final, 4).tolist(),
                       "weight_module": self.weight_layer[li] if self.weight_layer else "",
                       "weight_distance_to_final": np.round(wc, 4).tolist(),
                       "weight_settled_from_epoch": w_first,
                       "cka_consecutive": np.round([c[li, i, i + 1] for i in range(len(self.epochs) - 1)], 4).tolist(),
                       "settled_from_epoch": first, "projection_cosine_consecutive": np.round(sims, 4).tolist()}
        return {"epochs": self.epochs.tolist(), "threshold": threshold, "layers": out}

    def save(self, path) -> Path:
        return save_dataclass(self, path)

    @classmethod
    def load(cls, path) -> "EvolutionResult":
        return load_dataclass(cls, path)


def _field_box(module, layer, position, hw, proj, cache):
    """Input box of a unit: receptive field when vizlearn.receptive_field exists, else projection support."""
    try:
        from .receptive_field import receptive_field, unit_box

        if layer not in cache:  # geometry does not change during training
            cache[layer] = receptive_field(module, layer, input_size=tuple(hw), in_channels=proj.shape[0])
        return tuple(int(v) for v in unit_box(cache[layer], tuple(position), tuple(hw)))
    except (ImportError, ValueError, RuntimeError):
        mag = np.abs(proj).sum(0)
        if mag.max() <= 0:
            return (0, 0, hw[0], hw[1])
        ys, xs = np.nonzero(mag > 1e-3 * mag.max())
        return (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)


class FeatureEvolution:
    """Training callback recording, at chosen epochs, each tracked unit's strongest activation over a
    fixed probe set, its deconvnet projection and receptive-field box (module docstring).

    ``probe_images``: normalised input tensor (N, C, H, W) (N >= 2; a few hundred at most: the
    Gram matrices are N x N). ``layers``: layer names whose representation is tracked.
    ``units``: ``{layer: [channels]}``; default: ``units_per_layer`` channels per layer drawn with
    ``seed``. ``mean``/``std`` only turn the probe images into displayable pixels.
    """

    def __init__(self, probe_images: torch.Tensor, layers, units: dict | None = None, *,
                 epochs=PAPER_EPOCHS, units_per_layer: int = 4, seed: int = 0, mean=None, std=None,
                 method: str = "deconvnet", batch_size: int = 128):
        if not torch.is_tensor(probe_images) or probe_images.ndim != 4:
            raise TypeError("probe_images must be a normalised tensor (N, C, H, W)")
        if probe_images.shape[0] < 2:
            raise ValueError("the probe set needs at least 2 images")
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError("give at least one layer")
        ep = sorted({int(e) for e in epochs})
        if not ep or ep[0] < 0:
            raise ValueError(f"epochs must be non-negative ints, got {epochs!r}")
        self.probe = probe_images.detach().float().cpu().clone()
        self.layers = list(layers)
        self.units = None if units is None else {k: [int(c) for c in v] for k, v in units.items()}
        self.epochs = tuple(ep)
        self.units_per_layer = units_per_layer
        self.seed = seed
        self.method = method
        self.batch_size = batch_size
        c = self.probe.shape[1]
        m = np.zeros(c) if mean is None else np.broadcast_to(np.asarray(mean, float), (c,))
        s = np.ones(c) if std is None else np.broadcast_to(np.asarray(std, float), (c,))
        self.display = np.clip(self.probe.permute(0, 2, 3, 1).numpy() * s + m, 0, 1).astype(np.float32)
        self._snaps: list[dict] = []
        self._fields: dict = {}
        self.extra: dict = {}
        self.seconds = 0.0

    # -- interface shared with vizlearn.finetune ------------------------------------------------
    def on_epoch_end(self, model, epoch: int | None = None) -> None:
        """Record a snapshot if ``epoch`` is one of the chosen epochs (else do nothing).

        Plain loop: ``cb.on_epoch_end(model, epoch)``. As a ``vizlearn.finetune`` callback it is
        called with one info dict; that dict must carry ``"model"`` (the model being trained) and
        ``"epoch"``.
        """
        if isinstance(model, Mapping):
            info = model
            if "model" not in info:
                raise ValueError("FeatureEvolution.on_epoch_end(info): the info dict has no 'model' entry "
                                 f"(keys: {sorted(info)}); call on_epoch_end(model, epoch) instead")
            model, epoch = info["model"], info.get("epoch")
        if epoch is None:
            raise TypeError("on_epoch_end needs the epoch number: on_epoch_end(model, epoch)")
        if int(epoch) in self.epochs and all(s["epoch"] != int(epoch) for s in self._snaps):
            t0 = time.perf_counter()
            self._snaps.append(self._record(unwrap_model(model), int(epoch)))
            self.seconds += time.perf_counter() - t0

    def on_train_begin(self, model) -> None:
        """Record epoch 0 (the initialisation) when 0 is among the chosen epochs."""
        self.on_epoch_end(model, 0)

    # -------------------------------------------------------------------------------------------
    def _resolve_units(self, module, acts):
        keys = [resolve_layer(module, ly).key for ly in self.layers]
        if self.units is None:
            rng = np.random.default_rng(self.seed)
            units = {}
            for k in keys:
                c = acts[k].shape[1]
                units[k] = sorted(rng.choice(c, size=min(self.units_per_layer, c), replace=False).tolist())
            self.units = units
        else:
            self.units = {resolve_layer(module, k).key: v for k, v in self.units.items()}
            for k, chans in self.units.items():
                if k not in keys:
                    raise ValueError(f"units given for layer {k!r}, which is not among layers={self.layers}")
                c = acts[k].shape[1]
                bad = [ch for ch in chans if not 0 <= ch < c]
                if bad:
                    raise ValueError(f"layer {k!r} has {c} channels; channels {bad} do not exist")
        self.layers = keys

    def _record(self, module, epoch):
        from .projection import project_units

        device = module_device(module)
        keys = [resolve_layer(module, ly).key for ly in self.layers]
        feats = {k: [] for k in keys}
        with analysis_mode(module), torch.no_grad():
            for i in range(0, self.probe.shape[0], self.batch_size):
                with capture(module, keys) as acts:
                    module(self.probe[i:i + self.batch_size].to(device))
                for k in keys:
                    feats[k].append(acts[k].float().cpu())
        feats = {k: torch.cat(v) for k, v in feats.items()}
        if not getattr(self, "_units_checked", False):
            self._resolve_units(module, feats)
            self._units_checked = True
        if not hasattr(self, "_wmod"):
            self._wmod = self._weight_modules(module)
        rec = {"epoch": epoch, "units": [], "image": [], "pos": [], "score": [], "box": [], "proj": []}
        hw = tuple(self.probe.shape[2:])
        for k in self.layers:
            a = feats[k]
            if a.ndim != 4:
                raise ValueError(f"layer {k!r} output has shape {tuple(a.shape)}; tracked layers must be spatial")
            units = []
            for ch in self.units.get(k, []):
                m = a[:, ch].flatten(1)  # (N, h*w)
                per_img = m.amax(1)
                img = int(per_img.argmax())
                flat = int(m[img].argmax())
                pos = (flat // a.shape[3], flat % a.shape[3])
                units.append((img, ch, pos))
                rec["units"].append((k, ch))
                rec["image"].append(img)
                rec["pos"].append(pos)
                rec["score"].append(float(per_img[img]))
            if units:
                proj = project_units(module, self.probe.to(device), k, units, method=self.method)
                proj = proj.detach().float().cpu().numpy()
                for (img, ch, pos), p in zip(units, proj):
                    rec["proj"].append(p)
                    rec["box"].append(_field_box(module, k, pos, hw, p, self._fields))
        grams = []
        for k in self.layers:
            f = feats[k].flatten(1).double()
            grams.append((f @ f.T).numpy())
        rec["gram"] = np.stack(grams)
        rec["weights"] = [None if self._wmod[k] is None else
                          dict(module.named_modules())[self._wmod[k]].weight.detach().double().cpu().clone()
                          for k in self.layers]
        return rec

    def _weight_modules(self, module):
        """For each layer: the last module with a ``weight`` registered at or before it."""
        out, last = {}, None
        order = list(module.named_modules())
        for k in self.layers:
            name = k.split(":")[0]
            last = None
            for n, m in order:
                if isinstance(getattr(m, "weight", None), torch.Tensor) and n:
                    last = n
                if n == name:
                    break
            out[k] = last
        return out

    def _weight_change(self, snaps):
        out = np.full((len(snaps), len(self.layers)), np.nan)
        for li in range(len(self.layers)):
            ws = [s["weights"][li] for s in snaps]
            if ws[0] is None:
                continue
            path = float((ws[-1] - ws[0]).norm())
            for e, w in enumerate(ws):
                out[e, li] = float((w - ws[-1]).norm()) / path if path > 0 else 0.0
        return out

    def result(self) -> EvolutionResult:
        """All snapshots so far as an :class:`EvolutionResult` (epochs in increasing order)."""
        if not self._snaps:
            raise RuntimeError("no snapshot recorded yet: call on_epoch_end(model, epoch) at one of "
                               f"the chosen epochs {self.epochs}")
        snaps = sorted(self._snaps, key=lambda s: s["epoch"])
        units = snaps[0]["units"]
        return EvolutionResult(
            epochs=np.array([s["epoch"] for s in snaps], dtype=np.int64), layers=tuple(self.layers),
            unit_layer=tuple(u[0] for u in units), unit_channel=np.array([u[1] for u in units], dtype=np.int64),
            image_index=np.array([s["image"] for s in snaps], dtype=np.int64),
            position=np.array([s["pos"] for s in snaps], dtype=np.int64).reshape(len(snaps), len(units), 2),
            score=np.array([s["score"] for s in snaps], dtype=np.float32),
            box=np.array([s["box"] for s in snaps], dtype=np.int64).reshape(len(snaps), len(units), 4),
            projection=np.array([s["proj"] for s in snaps], dtype=np.float32),
            probe=self.display, gram=np.stack([s["gram"] for s in snaps]).astype(np.float32),
            weight_layer=tuple(self._wmod[k] or "" for k in self.layers),
            weight_change=self._weight_change(snaps),
            extra={k: np.asarray(v) for k, v in self.extra.items()} or None)


# ----------------------------------------------------------------------------------------------
# demo: a small CNN trained from scratch on scikit-learn digits
# ----------------------------------------------------------------------------------------------

def small_cnn(seed: int = 0, in_channels: int = 1, classes: int = 10) -> nn.Sequential:
    """conv5x5(16)-ReLU-pool / conv3x3(32)-ReLU-pool / conv3x3(64)-ReLU-pool / GAP / linear."""
    from collections import OrderedDict

    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 16, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(32, 64, 3, padding=1)), ("relu3", nn.ReLU()), ("pool3", nn.MaxPool2d(2)),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(64, classes)),
    ]))


def digits_data(size: int = 32, seed: int = 0):
    """scikit-learn digits upsampled to ``size`` px, normalised to mean 0 / std 1 (pixel 0.5 -> 0):
    (x_train, y_train, x_test, y_test) with a 75 / 25 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)
    cut = int(0.75 * len(y))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def train_small_cnn_demo(*, epochs: int = 64, record=PAPER_EPOCHS, seed: int = 0, size: int = 32,
                         n_probe: int = 200, lr: float = 0.03, batch_size: int = 64,
                         threads: int | None = None) -> tuple[EvolutionResult, nn.Module]:
    """Train :func:`small_cnn` from scratch on digits (SGD, momentum 0.9) for ``epochs`` epochs,
    recording feature evolution at the epochs in ``record`` (plus 0 = initialisation) on
    ``n_probe`` held-out digits; 4 units per conv layer (post-ReLU). Returns (result, model).
    The training log (loss, test accuracy per epoch) is in ``result.extra``."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train_demo(epochs, record, seed, size, n_probe, lr, batch_size)
    finally:
        torch.set_num_threads(old_threads)


def _train_demo(epochs, record, seed, size, n_probe, lr, batch_size):
    xtr, ytr, xte, yte = digits_data(size, seed)
    model = small_cnn(seed)
    probe = xte[:n_probe]
    rec = tuple(sorted({0, *[e for e in record if e <= epochs]}))
    cb = FeatureEvolution(probe, ["relu1", "relu2", "relu3"], epochs=rec, units_per_layer=4, seed=seed, mean=0.5, std=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    cb.on_train_begin(model)
    losses, accs = [], []
    for ep in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        tot = 0.0
        for i in range(0, len(ytr), batch_size):
            b = perm[i:i + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xtr[b]), ytr[b])
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(b)
        model.eval()
        with torch.no_grad():
            accs.append(float((model(xte).argmax(1) == yte).float().mean()))
        losses.append(tot / len(ytr))
        cb.on_epoch_end(model, ep)
    cb.extra = {"loss": np.array(losses), "test_accuracy": np.array(accs), "epoch": np.arange(1, epochs + 1)}
    return cb.result(), model


def run_evolution(out_dir, *, epochs: int = 64, record=PAPER_EPOCHS, seed: int = 0, lr: float = 0.03,
                  threads: int | None = 1) -> EvolutionResult:
    """Train the digits CNN (:func:`train_small_cnn_demo`) and write ``evolution.png`` (units x
    epochs), ``evolution_settle.png`` / ``evolution_settle.json`` (per layer distance to the final
    epoch, settle epochs, final accuracy, seconds) and ``evolution.npz/.json``."""
    import json

    from .plot_experiments import plot_evolution, plot_evolution_settle

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res, _ = train_small_cnn_demo(epochs=epochs, record=record, seed=seed, lr=lr, threads=threads)
    seconds = time.perf_counter() - t0
    res.save(out / "evolution")
    info = res.settle()
    info["final_test_accuracy"] = float(res.extra["test_accuracy"][-1])
    info["train_and_record_seconds"] = round(seconds, 1)
    (out / "evolution_settle.json").write_text(json.dumps(info, indent=1))
    note = (f"small CNN trained from scratch on scikit-learn digits (32 px, SGD lr {lr}), "
            f"{res.probe.shape[0]} held-out probe digits; test accuracy {info['final_test_accuracy']:.1%}")
    plot_evolution(res, note=note).savefig(out / "evolution.png", dpi=110)
    plot_evolution_settle(res).savefig(out / "evolution_settle.png", dpi=110)
    return res
