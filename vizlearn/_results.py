"""Save/load of frozen result dataclasses: arrays (and dicts of arrays) to ``stem.npz``, the rest to
``stem.json``. Shared by the experiment results (occlusion, invariance, correspondence, evolution,
layer 1)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

__all__ = ["save_dataclass", "load_dataclass"]


def _stem(path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".npz", ".json") else p


def _json_default(v):
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"cannot write {type(v).__name__} to JSON")


def _tuplify(v):
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuplify(x) for k, x in v.items()}
    return v


def save_dataclass(obj, path) -> Path:
    """Write a frozen dataclass: arrays (and dicts of arrays) to ``stem.npz``, the rest to ``stem.json``.

    Returns the stem (``path`` without a ``.npz``/``.json`` suffix)."""
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, {"__class__": type(obj).__name__}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, np.ndarray):
            arrays[f.name] = v
        elif isinstance(v, dict) and v and all(isinstance(a, np.ndarray) for a in v.values()):
            for k, a in v.items():
                arrays[f"{f.name}/{k}"] = a
            meta[f.name] = {"__arraydict__": list(v.keys())}
        else:
            meta[f.name] = v
    np.savez_compressed(stem.with_suffix(".npz"), **arrays)
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=_json_default))
    return stem


def load_dataclass(cls, path):
    """Read back what :func:`save_dataclass` wrote, as an instance of ``cls`` (lists become tuples)."""
    stem = _stem(path)
    meta = json.loads(stem.with_suffix(".json").read_text())
    with np.load(stem.with_suffix(".npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in arrays:
            kwargs[f.name] = arrays[f.name]
        elif isinstance(meta.get(f.name), dict) and "__arraydict__" in meta[f.name]:
            kwargs[f.name] = {k: arrays[f"{f.name}/{k}"] for k in meta[f.name]["__arraydict__"]}
        elif f.name in meta:
            kwargs[f.name] = _tuplify(meta[f.name])
        elif f.default is not dataclasses.MISSING:
            kwargs[f.name] = f.default
        else:
            raise ValueError(f"{stem}: field {f.name!r} missing from the saved {cls.__name__}")
    return cls(**kwargs)
