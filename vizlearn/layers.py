"""Layer discovery and name resolution.

Every vizlearn function that takes a ``layer`` goes through :func:`resolve_layer`, so the
same names work everywhere:

* any name from ``model.named_modules()`` (``"features.3"``, ``"layer1.0.conv1"``);
* for a model wrapped in ``nn.DataParallel`` / ``DistributedDataParallel``, both ``"conv1"``
  and ``"module.conv1"``;
* a module that runs several times in one forward pass (torchvision's ``BasicBlock.relu``)
  is addressed per call: ``"layer1.0.relu"`` is the first call, ``"layer1.0.relu:1"`` the
  second, and so on.

Unknown names raise ``ValueError`` listing the closest valid names.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerInfo", "LayerRef", "resolve_layer", "list_layers", "layer_names", "unwrap_model", "module_device"]

_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap_model(model) -> nn.Module:
    """Return the ``nn.Module`` behind ``model``.

    Accepts an ``nn.Module``, a :class:`vizlearn.LoadedModel` (anything with a ``.model``
    attribute that is a module) or a DataParallel wrapper (kept as is: its ``module.``
    names are handled by :func:`resolve_layer`).
    """
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected a torch.nn.Module or a vizlearn LoadedModel, got {type(model).__name__}")


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer: canonical name (as in ``named_modules()``), the module, the call index."""

    name: str
    module: nn.Module
    call: int = 0

    @property
    def key(self) -> str:
        """The name under which results are stored: ``name`` or ``name:call``."""
        return self.name if self.call == 0 else f"{self.name}:{self.call}"


def layer_names(model) -> list[str]:
    """All addressable module names of ``model`` (the root module excluded)."""
    return [n for n, _ in unwrap_model(model).named_modules() if n]


def resolve_layer(model, layer: str) -> LayerRef:
    """Resolve a user-given layer name (see the module docstring) to a :class:`LayerRef`."""
    if isinstance(layer, LayerRef):
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str), got {type(layer).__name__}")
    model = unwrap_model(model)
    name, call = layer, 0
    if ":" in layer:
        name, _, idx = layer.rpartition(":")
        if not idx.isdigit():
            raise ValueError(f"layer {layer!r}: the part after ':' must be a call index such as ':1'")
        call = int(idx)
    modules = dict(model.named_modules())
    candidates = [name]
    if isinstance(model, _WRAPPERS):
        candidates.append("module." + name)
    for cand in candidates:
        if cand and cand in modules:
            return LayerRef(cand, modules[cand], call)
    valid = [n for n in modules if n]
    if isinstance(model, _WRAPPERS):
        valid += [n[len("module."):] for n in valid if n.startswith("module.")]
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"unknown layer {layer!r} in {type(model).__name__}.{hint} "
        "Run `vizlearn layers MODEL` (or vizlearn.list_layers(model)) to see every layer."
    )


@dataclass(frozen=True)
class LayerInfo:
    """One row of :func:`list_layers`."""

    name: str  # key as accepted by every vizlearn function (``name`` or ``name:call``)
    kind: str  # module class name, e.g. "Conv2d"
    out_shape: tuple  # output shape for one image, e.g. (64, 56, 56); () if not a tensor
    rf_size: tuple | None  # receptive field (height, width) in input pixels, None if not spatial
    rf_jump: tuple | None  # stride of the layer's grid in input pixels
    rf_start: tuple | None  # centre of unit (0, 0) in input pixel coordinates


def _describe(out) -> tuple:
    if torch.is_tensor(out):
        return tuple(out.shape[1:])
    return ()


def list_layers(model, *, input_size: int | tuple = 224, in_channels: int = 3, leaves_only: bool = False,
                receptive_fields: bool = True) -> list[LayerInfo]:
    """Every module of ``model`` in execution order, with kind, output shape and receptive field.

    Runs one forward pass on a zero image of ``input_size`` (a side or ``(H, W)``); modules
    that run several times get one row per call (``name:1``, ...); modules that never ran are
    left out. ``model`` is left as found (eval mode only for the probe pass).
    """
    from .capture import record_calls
    from .receptive_field import receptive_field

    module = unwrap_model(model)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    x = torch.zeros(1, in_channels, *size, device=module_device(module))
    names = layer_names(module)
    calls = record_calls(module, names, x)
    rows = []
    for key, (mod, out) in calls.items():
        if leaves_only and any(True for _ in mod.children()):
            continue
        shape = _describe(out)
        size_, jump, start = None, None, None
        if receptive_fields and len(shape) == 3:
            try:
                rf = receptive_field(module, key, input_size=size, in_channels=in_channels)
                size_, jump, start = rf.size, rf.jump, rf.start
            except (ValueError, RuntimeError):
                pass
        rows.append(LayerInfo(key, type(mod).__name__, shape, size_, jump, start))
    return rows


def module_device(module: nn.Module, default=None) -> torch.device:
    """Device of the first parameter (else buffer) of ``module``; ``default`` (CPU if None) when it has neither."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu") if default is None else default
