"""Record layer outputs with forward hooks, safely.

``capture`` is a context manager: it resolves every layer name first (an unknown name is a
``ValueError`` before anything is registered), registers one forward hook per module, and
removes all hooks in ``finally``. Stored values are ``output.detach().clone()``, so an
in-place operation later in the forward pass cannot change them. A module that runs several
times in one forward pass gets one record per call: ``"name"`` (first call), ``"name:1"``, ...

    >>> with vizlearn.capture(model, ["layer1", "layer2.0.conv1"]) as acts:
    ...     model(x)
    >>> acts["layer1"].shape

Layers whose output is a tuple, list, namedtuple or dict need ``select=`` (an index, a key or
a callable that returns the tensor); without it the error names the structure found.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .layers import LayerRef, resolve_layer, unwrap_model

__all__ = ["capture", "select_output", "run_to_layer", "record_calls", "Captured"]


def _structure(out) -> str:
    if torch.is_tensor(out):
        return f"Tensor{tuple(out.shape)}"
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return f"{type(out).__name__}({', '.join(out._fields)})"
    if isinstance(out, Mapping):
        return f"dict(keys={list(out.keys())})"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of {len(out)}: [{', '.join(_structure(o) for o in out)}]"
    return type(out).__name__


def select_output(out, select=None, *, where: str = "output"):
    """Pick the tensor out of a module's (or model's) output.

    ``select``: None (the output must be a tensor), an int index, a str key or field name, or
    a callable ``out -> Tensor``. A tensor output is returned as is unless ``select`` is a
    callable, so one ``select`` can serve several layers of which only some return tuples.
    """
    if torch.is_tensor(out) and not callable(select):
        return out  # an index or key selects inside tuple/dict outputs only, never slices a tensor
    if select is None:
        raise TypeError(
            f"{where} is a {_structure(out)}, not a tensor; pass select= (an index, a key or a "
            "callable returning the tensor) to say which part to use"
        )
    if callable(select):
        picked = select(out)
    elif isinstance(select, str):
        picked = out[select] if isinstance(out, Mapping) else getattr(out, select)
    else:
        picked = out[select]
    if not torch.is_tensor(picked):
        raise TypeError(f"select={select!r} on {where} gave {_structure(picked)}, not a tensor")
    return picked


class Captured(dict):
    """Dict of captured tensors, ``{key: Tensor}``; ``missing()`` lists requested keys that never ran."""

    def __init__(self, requested: Sequence[str]):
        super().__init__()
        self.requested = list(requested)

    def missing(self) -> list[str]:
        return [k for k in self.requested if k not in self]


def _hook_all_calls(refs: Sequence[LayerRef], on_output: Callable[[LayerRef, str, object], None]):
    """Register one hook per distinct module; ``on_output(ref, key, output)`` per call. Returns handles."""
    by_module: dict[int, list[LayerRef]] = {}
    for ref in refs:
        by_module.setdefault(id(ref.module), []).append(ref)
    handles = []
    for group in by_module.values():
        counter = {"n": 0}
        first = group[0]

        def hook(module, inputs, output, _group=group, _counter=counter, _first=first):
            call = _counter["n"]
            _counter["n"] += 1
            key = _first.name if call == 0 else f"{_first.name}:{call}"
            on_output(LayerRef(_first.name, module, call), key, output)

        handles.append(first.module.register_forward_hook(hook))
    return handles


@contextlib.contextmanager
def capture(model, layers: str | Sequence[str], *, select=None, detach: bool = True):
    """Context manager recording the outputs of ``layers`` during the forward passes inside it.

    Every call of a requested module is recorded (key ``name`` for the first, ``name:k`` for
    the k-th). If several forward passes run inside the block, the last one wins per key.
    On exit, a requested layer that never ran raises ``RuntimeError``.
    ``detach=False`` keeps the values attached to the autograd graph (not cloned).
    """
    module = unwrap_model(model)
    if isinstance(layers, str):
        layers = [layers]
    refs = [resolve_layer(module, name) for name in layers]
    result = Captured([r.key for r in refs])

    def on_output(ref, key, output):
        value = select_output(output, select, where=f"output of layer {ref.name!r}")
        result[key] = value.detach().clone() if detach else value

    handles = _hook_all_calls(refs, on_output)
    ok = False
    try:
        yield result
        ok = True
    finally:
        for h in handles:
            h.remove()
    if ok and result.missing():
        raise RuntimeError(
            f"layer(s) {result.missing()} never ran during the forward pass (the module exists but "
            "is not used by forward(), or has fewer calls than the ':k' index asks for)"
        )


class _StopForward(Exception):
    pass


def run_to_layer(model, x: torch.Tensor, layer: str, *, select=None) -> torch.Tensor:
    """Run ``model`` on ``x`` only as far as ``layer`` (its requested call) and return that output.

    The returned tensor stays attached to the autograd graph (if grad is enabled), so a
    backward pass from it reaches ``x``. The rest of the network is not computed.
    """
    module = unwrap_model(model)
    ref = resolve_layer(module, layer)
    box: dict[str, torch.Tensor] = {}

    def on_output(r, key, output):
        if r.call == ref.call:
            box["out"] = select_output(output, select, where=f"output of layer {ref.name!r}")
            raise _StopForward

    handles = _hook_all_calls([ref], on_output)
    try:
        module(x)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if "out" not in box:
        raise RuntimeError(f"layer {ref.key!r} never ran during the forward pass")
    return box["out"]


def record_calls(model, layers: Sequence[str], x: torch.Tensor) -> dict[str, tuple[nn.Module, object]]:
    """One forward pass in eval mode (no grad); ``{key: (module, output)}`` in execution order.

    Non-tensor outputs are kept as they are (used by :func:`vizlearn.list_layers`).
    """
    from .state import eval_mode

    module = unwrap_model(model)
    refs = [resolve_layer(module, n) for n in layers]
    calls: dict[str, tuple[nn.Module, object]] = {}

    def on_output(ref, key, output):
        calls[key] = (ref.module, output.detach() if torch.is_tensor(output) else output)

    handles = _hook_all_calls(refs, on_output)
    try:
        with eval_mode(module), torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return calls
