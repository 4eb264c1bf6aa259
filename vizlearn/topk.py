"""Streaming top-k: for every channel of a layer, the k images that excite it most.

The rule (Zeiler & Fergus's top-9, as DeepVis and NetDissect implement it): per image and
channel the score is the spatial maximum of the channel's map, at the first position (row-major)
where it is reached; across images the k highest scores, at most one entry per image; ties go to
the lower image index. NaN maps rank below every number.

Memory: one forward pass per batch for all requested layers (``vizlearn.capture``); the maps of
the current batch are reduced to a ``(C, batch)`` max/argmax and merged into the running
``(C, k)`` best with a stable sort, then dropped. What is kept is ``C x k`` entries per layer,
whatever the number of images (see ``benchmarks/bench_topk_memory.py``).

Layer outputs must be ``(N, C, H, W)`` maps; ``(N, C)`` outputs (a linear layer, logits) are
treated as 1x1 maps whose unit sees the whole image (box = the full image). Anything else is a
``ValueError``. The model runs in eval mode with in-place ops disabled, under ``torch.no_grad``,
and is left as found.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .capture import capture
from .layers import module_device, resolve_layer, unwrap_model
from .state import analysis_mode

__all__ = ["TopK", "top_k"]


@dataclass(frozen=True)
class TopK:
    """Top-k result of one layer. Rows are channels, columns ranks (best first).

    Empty slots (fewer images than k) have ``image_index == -1``, ``score == -inf`` and
    position/box ``-1``.
    """

    layer: str
    scores: np.ndarray  # (C, k) float32, spatial max of the channel's map
    image_index: np.ndarray  # (C, k) int64, index into the image stream, -1 = empty
    position: np.ndarray  # (C, k, 2) int64, (row, col) of the max in the feature map
    box: np.ndarray  # (C, k, 4) int64, (y0, x0, y1, x1) receptive field clipped to the image (half-open)

    def __post_init__(self):
        c, k = np.shape(self.scores)
        if np.shape(self.image_index) != (c, k) or np.shape(self.position) != (c, k, 2) \
                or np.shape(self.box) != (c, k, 4):
            raise ValueError("TopK arrays must have shapes scores/image_index (C, k), position (C, k, 2), "
                             f"box (C, k, 4); got {np.shape(self.scores)}, {np.shape(self.image_index)}, "
                             f"{np.shape(self.position)}, {np.shape(self.box)}")

    @property
    def k(self) -> int:
        return int(self.scores.shape[1])

    @property
    def channels(self) -> int:
        return int(self.scores.shape[0])

    def to_dict(self) -> dict:
        """Plain dict of arrays (and the layer name), ready for ``np.savez``."""
        return {"layer": self.layer, "scores": self.scores, "image_index": self.image_index,
                "position": self.position, "box": self.box}

    @classmethod
    def from_dict(cls, d) -> "TopK":
        return cls(layer=str(d["layer"]), scores=np.asarray(d["scores"], dtype=np.float32),
                   image_index=np.asarray(d["image_index"], dtype=np.int64),
                   position=np.asarray(d["position"], dtype=np.int64), box=np.asarray(d["box"], dtype=np.int64))

    def save(self, path) -> Path:
        """Write ``path`` (``.npz``; the layer name is stored as JSON inside). Returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        d = self.to_dict()
        np.savez(path, meta=np.array(json.dumps({"layer": self.layer})),
                 **{k: v for k, v in d.items() if k != "layer"})
        return path

    @classmethod
    def load(cls, path) -> "TopK":
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls.from_dict({"layer": meta["layer"], **{k: z[k] for k in ("scores", "image_index",
                                                                                 "position", "box")}})


class _Running:
    """Running (C, k) best for one layer."""

    def __init__(self, channels: int, k: int):
        self.scores = np.full((channels, k), -np.inf, dtype=np.float32)
        self.index = np.full((channels, k), -1, dtype=np.int64)
        self.flat = np.full((channels, k), -1, dtype=np.int64)

    def merge(self, scores: np.ndarray, index: np.ndarray, flat: np.ndarray):
        """Merge candidates (C, B); running entries precede the batch, so ties keep lower indices."""
        k = self.scores.shape[1]
        s = np.concatenate([self.scores, scores], axis=1)
        i = np.concatenate([self.index, index], axis=1)
        f = np.concatenate([self.flat, flat], axis=1)
        # primary: filled before empty; then score descending (NaN last); then image index ascending
        order = np.lexsort((i, -s.astype(np.float64), i < 0), axis=-1)[:, :k]
        self.scores = np.take_along_axis(s, order, axis=1)
        self.index = np.take_along_axis(i, order, axis=1)
        self.flat = np.take_along_axis(f, order, axis=1)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be at least 1, got {k}")
    return int(k)


def top_k(model, images, layers: str | Sequence[str], k: int = 9, *, batch_size: int = 32, device=None,
          progress: bool = False, select=None) -> dict[str, TopK]:
    """Per channel of each layer, the ``k`` images with the highest spatial-max activation.

    ``model``: an ``nn.Module`` or a LoadedModel. ``images``: an ``(N, C, H, W)`` tensor (already
    normalised), an iterable of such batches, or an ImageSet (then ``model`` must be a
    LoadedModel) -- see :func:`vizlearn.images.batches`. ``layers``: a name or a list of names
    (any accepted by :func:`vizlearn.layers.resolve_layer`). ``device``: where to run; ``None``
    means the model's device (the model is never moved: a different device is an error).
    ``select``: picks the tensor of layers with tuple/dict outputs (see ``capture``).

    Returns ``{key: TopK}`` in the order of ``layers``. Image indices count images in stream
    order. Boxes are the units' receptive fields clipped to the image.
    """
    from .images import batches as _batches
    from .receptive_field import receptive_fields

    k = _check_k(k)
    module = unwrap_model(model)
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise ValueError("layers is empty; name at least one layer (see vizlearn.list_layers(model))")
    refs = [resolve_layer(module, name) for name in layers]
    keys = list(dict.fromkeys(r.key for r in refs))
    model_dev = module_device(module)
    dev = model_dev if device is None else torch.device(device)
    if dev.type != model_dev.type or (dev.index is not None and model_dev.index is not None
                                       and dev.index != model_dev.index):
        raise ValueError(f"the model is on {model_dev} but device={device!r}; move the model first "
                         f"(model.to({str(dev)!r})) -- top_k does not move your model")
    stream = _batches(images, model=model, batch_size=batch_size)
    if progress:
        from tqdm.auto import tqdm
        n = len(images) if torch.is_tensor(images) or hasattr(images, "names") else None
        stream = tqdm(stream, desc="top-k", unit="batch", total=None if n is None else -(-n // batch_size))

    running: dict[str, _Running] = {}
    map_hw: dict[str, tuple[int, int]] = {}
    spatial: dict[str, bool] = {}
    image_hw = None
    in_channels = None
    seen = 0
    with analysis_mode(module), torch.no_grad():
        for x in stream:
            if not torch.is_tensor(x) or x.dim() != 4:
                raise ValueError(f"each batch must be an (N, C, H, W) tensor, got "
                                 f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
            if image_hw is None:
                image_hw, in_channels = tuple(x.shape[-2:]), int(x.shape[1])
            elif tuple(x.shape[-2:]) != image_hw or int(x.shape[1]) != in_channels:
                raise ValueError(f"all images must have the same shape; got {tuple(x.shape[1:])} after "
                                 f"{(in_channels, *image_hw)}")
            b = int(x.shape[0])
            if b == 0:
                continue
            with capture(module, keys, select=select) as acts:
                module(x.to(dev))
            index = np.arange(seen, seen + b, dtype=np.int64)
            for key in keys:
                a = acts.pop(key)
                if a.dim() == 2:
                    a = a[:, :, None, None]
                    spatial[key] = False
                elif a.dim() == 4:
                    spatial[key] = True
                else:
                    raise ValueError(f"layer {key!r} outputs shape {tuple(a.shape)}; top_k needs (N, C, H, W) "
                                     "maps (or (N, C) vectors, treated as 1x1 maps)")
                c, h, w = (int(v) for v in a.shape[1:])
                if key not in running:
                    running[key] = _Running(c, k)
                    map_hw[key] = (h, w)
                elif running[key].scores.shape[0] != c or map_hw[key] != (h, w):
                    raise ValueError(f"layer {key!r} changed shape between batches")
                vals, flat = a.reshape(b, c, h * w).max(dim=-1)  # first max in row-major order
                running[key].merge(vals.T.float().cpu().numpy(), np.broadcast_to(index, (c, b)),
                                   flat.T.cpu().numpy().astype(np.int64))
                del a, vals, flat
            del acts
            seen += b
    if seen == 0:
        raise ValueError("no images: the image source yielded no batches")

    spatial_keys = [key for key in keys if spatial[key]]
    fields = receptive_fields(module, spatial_keys, input_size=image_hw, in_channels=in_channels,
                              select=select) if spatial_keys else {}
    out = {}
    H, W = image_hw
    for key in keys:
        r = running[key]
        empty = r.index < 0
        h, w = map_hw[key]
        rows, cols = np.divmod(r.flat, w)
        position = np.stack([rows, cols], axis=-1).astype(np.int64)
        if spatial[key]:
            f = fields[key]
            lo = [int(round(f.start[d] - (f.size[d] - 1) / 2)) for d in (0, 1)]
            y0 = lo[0] + rows * f.jump[0]
            x0 = lo[1] + cols * f.jump[1]
            box = np.stack([np.clip(y0, 0, H), np.clip(x0, 0, W),
                            np.clip(y0 + f.size[0], 0, H), np.clip(x0 + f.size[1], 0, W)], axis=-1)
        else:
            box = np.broadcast_to(np.array([0, 0, H, W]), r.flat.shape + (4,)).copy()
        box = box.astype(np.int64)
        position[empty] = -1
        box[empty] = -1
        out[key] = TopK(layer=key, scores=r.scores.copy(), image_index=r.index.copy(), position=position,
                        box=box)
    return out
