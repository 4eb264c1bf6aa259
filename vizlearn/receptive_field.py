"""Receptive fields: where in the input a unit of a layer looks.

A unit ``(i, j)`` of a layer sees the input rectangle whose centre is
``start + (i, j) * jump`` and whose side is ``size`` (all in input pixels, rows first). For a
chain of convolutions and poolings these three numbers compose exactly: a layer with kernel
``k``, stride ``s``, padding ``p`` and dilation ``d`` on a map with geometry
``(size, jump, lo)`` (``lo`` = first input pixel of unit 0) gives::

    size' = size + (d * (k - 1)) * jump      jump' = s * jump      lo' = lo - p * jump

Two methods, one answer (the tests check one against the other):

``method="analytic"`` (exact by composition)
    One forward pass of the real model on a zero image, under a
    :class:`torch.overrides.TorchFunctionMode` that carries ``(size, jump, lo)`` along with every
    tensor derived from the input: ``conv2d``, ``max/avg_pool2d``, ``pad`` and uniform adaptive
    pooling compose as above; element-wise ops, norms, activations, ``cat`` along channels and
    residual additions take the union (bounding box) of their inputs' fields; spatial reductions
    (``mean`` over H, W, global pooling, SE gates) make the field the whole image, and so does
    every op downstream of them. This is a walk through the modules in execution order, so it
    works for ``nn.Sequential`` chains and for branching nets (ResNet, EfficientNet, DenseNet,
    Inception) alike, for all layers at once, in one pass. Ops it cannot reason about
    (interpolation, transposes of H/W, conv_transpose, ...) mark the result unknown.

``method="empirical"``
    On a float64 deep copy of the model (the caller's model is never touched) linearised by a
    function mode: conv/linear weights replaced by positive constants, biases dropped,
    rectifiers / activations / norms / dropout the identity, max-pooling replaced by average
    pooling of the same geometry. The nonzero input-gradient pixels of one unit near the centre
    of the layer's map are then its theoretical field; a second unit one step down-right gives
    the jump. If the support touches the border the probe input is doubled (up to 8x) so deep
    layers get their full size. A unit whose support is the whole input at every probe size is
    *global* (see below).

``method="auto"`` (default) is analytic, falling back to empirical for layers the analytic walk
marks unknown. Results of the analytic walk are cached per model (weakly), input size and
channel count, so :func:`vizlearn.list_layers` on EfficientNet-Lite0 costs one forward pass.

Global fields: after a global pooling, or after a squeeze-and-excitation gate (EfficientNet-B0,
MobileNetV3; not the Lite variants), every unit depends on every pixel. Such layers get
``Field(size=(H, W), jump=(H, W), start=((H-1)/2, (W-1)/2))``: the box of any unit is the
whole image. ``ignore_global=True`` (analytic only) instead ignores broadcast global gates
in unions, giving the local field of the main path, which is usually what one wants for patches.

Boxes and patches: :func:`unit_box` clips the field to the image (half-open ``(y0, x0, y1,
x1)``); :func:`crop_patch` returns an array of exactly ``field.size`` with the out-of-image part
set to ``fill`` (NaN by default, which :mod:`vizlearn.plot` draws as a checkerboard so padding is
visible as such, never mistaken for dark image content).
"""
from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .layers import LayerRef, resolve_layer, unwrap_model

__all__ = ["Field", "receptive_field", "receptive_fields", "unit_box", "crop_patch"]


@dataclass(frozen=True)
class Field:
    """Receptive field of a layer's units, in input pixels, ``(rows, cols)``.

    ``size``: side of the field; ``jump``: distance between the fields of neighbouring units;
    ``start``: centre of unit ``(0, 0)`` (may be negative, or x.5 for even sizes).
    """

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]

    def box(self, position, image_hw) -> tuple[int, int, int, int]:
        """Same as :func:`unit_box`."""
        return unit_box(self, position, image_hw)


# --------------------------------------------------------------------------------------------
# geometry algebra: per dim (size, jump, lo) with lo = first input pixel of unit 0
# --------------------------------------------------------------------------------------------
GLOBAL = "global"
UNKNOWN = "unknown"


def _pair(v, default=None):
    if v is None:
        return default
    if isinstance(v, (list, tuple)):
        if len(v) == 0:
            return default
        if len(v) == 1:
            return (int(v[0]), int(v[0]))
        return (int(v[-2]), int(v[-1]))
    return (int(v), int(v))


def _compose(g, kernel, stride, padding, dilation):
    """Geometry after a window op (conv / pool) with per-dim kernel, stride, padding, dilation."""
    if g in (GLOBAL, UNKNOWN):
        return g
    return tuple(
        (size + dil * (k - 1) * jump, s * jump, lo - p * jump)
        for (size, jump, lo), k, s, p, dil in zip(g, kernel, stride, padding, dilation)
    )


def _union(geoms):
    if any(g == GLOBAL for g in geoms):
        return GLOBAL
    if not geoms or any(g == UNKNOWN for g in geoms):
        return UNKNOWN
    out = []
    for dim in zip(*geoms):
        jumps = {j for _, j, _ in dim}
        if len(jumps) != 1:
            return UNKNOWN
        lo = min(lo for _, _, lo in dim)
        hi = max(lo + size - 1 for size, _, lo in dim)
        out.append((hi - lo + 1, jumps.pop(), lo))
    return tuple(out)


def _to_field(g, hw) -> Field:
    if g == GLOBAL:
        return Field((hw[0], hw[1]), (hw[0], hw[1]), ((hw[0] - 1) / 2, (hw[1] - 1) / 2))
    (sh, jh, lh), (sw, jw, lw) = g
    return Field((int(sh), int(sw)), (int(jh), int(jw)), (lh + (sh - 1) / 2, lw + (sw - 1) / 2))


def _arg(args, kwargs, i, name, default=None):
    if name in kwargs:
        return kwargs[name]
    if len(args) > i:
        return args[i]
    return default


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "std_mean", "var_mean",
               "logsumexp", "norm", "prod", "nansum", "nanmean", "median", "nanmedian", "softmax",
               "log_softmax", "argmax", "argmin", "cumsum", "cumprod", "sort", "topk", "kthvalue"}
_SPATIAL_MOVERS = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample",
                   "affine_grid", "pixel_shuffle", "pixel_unshuffle", "flip", "fliplr", "flipud", "roll",
                   "rot90", "unfold", "fold", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                   "conv1d", "conv3d", "gather", "index_select", "take_along_dim", "scatter", "t",
                   "max_pool1d", "max_pool3d", "avg_pool1d", "avg_pool3d", "lp_pool2d", "diagonal",
                   "fractional_max_pool2d", "max_unpool2d", "as_strided", "unfold_copy", "narrow"}
_TRANSPOSE = {"transpose", "swapaxes", "swapdims", "transpose_"}


def _conv2d_shape_only(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A zero tensor of ``F.conv2d``'s output shape: the geometry walk needs shapes, not values,
    and skipping the arithmetic makes it cost about nothing (values downstream are irrelevant)."""
    if input.dim() not in (3, 4) or weight.dim() != 4:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if input.shape[-3] != weight.shape[1] * groups:
        raise RuntimeError(f"conv2d: input has {input.shape[-3]} channels, weight expects "
                           f"{weight.shape[1] * groups}")
    k = tuple(weight.shape[-2:])
    s, d = _pair(stride), _pair(dilation)
    if padding == "same":
        size = tuple(input.shape[-2:])
    else:
        p = (0, 0) if padding == "valid" else _pair(padding)
        size = tuple((L + 2 * pi - di * (ki - 1) - 1) // si + 1
                     for L, ki, si, pi, di in zip(input.shape[-2:], k, s, p, d))
    if min(size) < 1:
        raise RuntimeError(f"conv2d: input {tuple(input.shape)} is too small for kernel {k}")
    return torch.zeros(*input.shape[:-3], weight.shape[0], *size, dtype=input.dtype, device=input.device)


class _GeometryMode(TorchFunctionMode):
    """Carries the (size, jump, lo) geometry of every input-derived tensor through the ops."""

    def __init__(self, geoms: WeakIdKeyDictionary, *, ignore_global: bool = False, shapes_only: bool = True):
        super().__init__()
        self.geoms = geoms
        self.ignore_global = ignore_global
        self.shapes_only = shapes_only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "conv2d" and self.shapes_only:
            out = _conv2d_shape_only(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        tracked = [t for t in _tensors((args, kwargs)) if t in self.geoms]
        if tracked:
            outs = [t for t in _tensors(out)]
            try:
                g = self._propagate(func, args, kwargs, tracked, outs)
            except Exception:  # noqa: BLE001 - any parsing surprise -> unknown, never a crash
                g = UNKNOWN
            for t in outs:
                if isinstance(g, dict):
                    self.geoms[t] = g.get(id(t), UNKNOWN)
                else:
                    self.geoms[t] = g
        return out

    def _propagate(self, func, args, kwargs, tracked, outs):
        name = getattr(func, "__name__", "")
        x = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("input")
        gx = self.geoms.get(x, UNKNOWN) if torch.is_tensor(x) else UNKNOWN
        if name == "__get__":
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            return UNKNOWN if attr in {"T", "mT", "H", "mH"} else _union([self.geoms[t] for t in tracked])
        if name == "conv2d":
            w = _arg(args, kwargs, 1, "weight")
            k = tuple(w.shape[-2:])
            s = _pair(_arg(args, kwargs, 3, "stride", 1))
            p = _arg(args, kwargs, 4, "padding", 0)
            d = _pair(_arg(args, kwargs, 5, "dilation", 1))
            if p == "valid":
                p = (0, 0)
            elif p == "same":
                p = tuple((di * (ki - 1)) // 2 for ki, di in zip(k, d))
            return _compose(gx, k, s, _pair(p), d)
        if name in ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d"):
            k = _pair(_arg(args, kwargs, 1, "kernel_size"))
            s = _pair(_arg(args, kwargs, 2, "stride", None), k)
            p = _pair(_arg(args, kwargs, 3, "padding", 0))
            d = _pair(_arg(args, kwargs, 4, "dilation", 1)) if name != "avg_pool2d" else (1, 1)
            g = _compose(gx, k, s, p, d)
            return {id(outs[0]): g} if len(outs) > 1 else g  # indices output: unknown
        if name == "pad":
            pad = list(_arg(args, kwargs, 1, "pad"))
            pad += [0] * (4 - len(pad))
            if gx in (GLOBAL, UNKNOWN):
                return gx
            (sh, jh, lh), (sw, jw, lw) = gx
            return ((sh, jh, lh - pad[2] * jh), (sw, jw, lw - pad[0] * jw))
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
            if gx in (GLOBAL, UNKNOWN):
                return gx
            out_hw, in_hw = tuple(outs[0].shape[-2:]), tuple(x.shape[-2:])
            if out_hw == (1, 1):
                return GLOBAL
            if all(i % o == 0 for i, o in zip(in_hw, out_hw)):
                k = tuple(i // o for i, o in zip(in_hw, out_hw))
                g = _compose(gx, k, k, (0, 0), (1, 1))
                return {id(outs[0]): g} if len(outs) > 1 else g
            return UNKNOWN
        if name in _SPATIAL_MOVERS:
            return UNKNOWN
        if name in _TRANSPOSE or name == "permute":
            nd = x.dim()
            if name == "permute":
                dims = _arg(args, kwargs, 1, "dims")
                dims = list(dims) if isinstance(dims, (list, tuple)) else list(args[1:])
                dims = [int(v) % nd for v in dims]
                keep = dims[-2:] == [nd - 2, nd - 1]
            else:
                d0, d1 = (int(_arg(args, kwargs, 1, "dim0")) % nd, int(_arg(args, kwargs, 2, "dim1")) % nd)
                keep = d0 < nd - 2 and d1 < nd - 2
            return gx if keep else UNKNOWN
        if name in _REDUCTIONS and torch.is_tensor(x) and x.dim() >= 2:
            dim = _arg(args, kwargs, 1, "dim", None)
            if not torch.is_tensor(dim):
                if dim is None:
                    if name in ("softmax", "log_softmax", "cumsum", "cumprod", "sort", "topk", "kthvalue"):
                        return UNKNOWN
                    return GLOBAL
                dims = dim if isinstance(dim, (list, tuple)) else [dim]
                nd = x.dim()
                if any(int(v) % nd >= nd - 2 for v in dims):
                    return GLOBAL
        # generic: element-wise / broadcast / channel-wise op
        geoms = []
        for t in tracked:
            gt = self.geoms[t]
            for o in outs:
                if o.dim() < 2 or t.dim() < 2:
                    if gt == GLOBAL:
                        geoms.append(GLOBAL)
                    else:
                        return UNKNOWN
                    break
                if tuple(t.shape[-2:]) == tuple(o.shape[-2:]):
                    geoms.append(gt)
                elif gt == GLOBAL:
                    if not (self.ignore_global and tuple(t.shape[-2:]) == (1, 1)):
                        geoms.append(GLOBAL)
                else:
                    return UNKNOWN
                break
        return _union(geoms) if geoms else (GLOBAL if not self.ignore_global else UNKNOWN)


# --------------------------------------------------------------------------------------------
# analytic walk (one forward, all module calls), cached per model
# --------------------------------------------------------------------------------------------
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


_GEOMETRY_ATTRS = ("kernel_size", "stride", "padding", "dilation", "output_size", "ceil_mode")


def _fingerprint(module: nn.Module):
    """Cheap identity of the architecture: which module objects, with which window geometry."""
    return tuple((id(m), type(m)) + tuple(repr(m.__dict__.get(a)) for a in _GEOMETRY_ATTRS)
                 for m in module.modules())


def _hw(input_size) -> tuple[int, int]:
    if isinstance(input_size, int):
        hw = (input_size, input_size)
    else:
        hw = tuple(int(v) for v in input_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"input_size must be a positive int or (H, W), got {input_size!r}")
    return hw


def _probe_dtype_device(module: nn.Module):
    for p in list(module.parameters()) + list(module.buffers()):
        if p.is_floating_point():
            return p.dtype, p.device
    for p in module.parameters():
        return torch.float32, p.device
    return torch.float32, torch.device("cpu")


def _analytic_all(module: nn.Module, hw, in_channels, *, select=None, ignore_global=False) -> dict:
    """``{key: geometry | "nonspatial"}`` for every module call, from one traced forward pass."""
    from .capture import _hook_all_calls, select_output
    from .state import eval_mode

    cache_key = (hw, in_channels, ignore_global)
    if select is None:
        entry = _CACHE.get(module, {}).get(cache_key)
        fp = _fingerprint(module)
        if entry is not None and entry[0] == fp:
            return entry[1]
    dtype, device = _probe_dtype_device(module)
    x = torch.zeros(1, in_channels, *hw, dtype=dtype, device=device)
    geoms = WeakIdKeyDictionary()
    geoms[x] = ((1, 1, 0), (1, 1, 0))
    result: dict = {}
    refs = [LayerRef(n, m) for n, m in module.named_modules() if n]

    def on_output(ref, key, output):
        try:
            t = select_output(output, select, where=f"output of layer {ref.name!r}")
        except (TypeError, KeyError, IndexError, AttributeError) as err:
            result[key] = ("error", str(err))
            return
        result[key] = geoms.get(t, UNKNOWN) if t.dim() == 4 else "nonspatial"

    handles = _hook_all_calls(refs, on_output)
    try:
        with eval_mode(module), torch.no_grad(), _GeometryMode(geoms, ignore_global=ignore_global):
            module(x)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"receptive field probe: the model failed on a zero input of shape {tuple(x.shape)} "
            f"({type(err).__name__}: {err}); pass input_size= / in_channels= that the model accepts"
        ) from err
    finally:
        for h in handles:
            h.remove()
    if select is None:
        _CACHE.setdefault(module, {})[cache_key] = (fp, result)
    return result


# --------------------------------------------------------------------------------------------
# empirical support on a linearised float64 copy
# --------------------------------------------------------------------------------------------
_IDENTITY_OPS = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu",
    "selu_", "celu", "celu_", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "softplus", "prelu", "rrelu", "rrelu_", "threshold", "threshold_", "logsigmoid",
    "softsign", "tanhshrink", "hardshrink", "softshrink", "clamp", "clamp_", "clip", "clip_", "clamp_min",
    "clamp_min_", "clamp_max", "clamp_max_", "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "batch_norm", "layer_norm", "group_norm", "instance_norm",
    "local_response_norm", "rms_norm",
}


def _avg_like_max(x, kernel_size, stride, padding, dilation, ceil_mode):
    """Average pooling (as a depthwise conv, so dilation works) with max-pooling's exact geometry."""
    k = _pair(kernel_size)
    s = _pair(stride, k)
    p = _pair(padding)
    d = _pair(dilation)
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    extra = []
    for L, ki, si, pi, di in zip(x.shape[-2:], k, s, p, d):
        span = L + 2 * pi - di * (ki - 1) - 1
        out = (math.ceil(span / si) if ceil_mode else span // si) + 1
        if ceil_mode and (out - 1) * si >= L + pi:
            out -= 1
        extra.append(max(0, (out - 1) * si + di * (ki - 1) + 1 - (L + 2 * pi)))
    x = F.pad(x, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]))
    c = x.shape[1]
    w = torch.full((c, 1, *k), 1.0 / (k[0] * k[1]), dtype=x.dtype, device=x.device)
    y = F.conv2d(x, w, None, s, 0, d, c)
    return y.squeeze(0) if squeeze else y


class _LinearMode(TorchFunctionMode):
    """Linearise a forward pass: positive constant weights, no biases, identity nonlinearities."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in _IDENTITY_OPS:
            x = args[0] if args else kwargs["input"]
            return x.clone()
        if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d", "linear"):
            args = list(args)
            w = args[1] if len(args) > 1 else kwargs.pop("weight")
            fan = w.shape[1] if name == "linear" else w[0].numel()
            w = torch.full_like(w, 1.0 / fan)
            if len(args) > 1:
                args[1] = w
            else:
                kwargs["weight"] = w
            if len(args) > 2:
                args[2] = None
            kwargs.pop("bias", None)
            return func(*args, **kwargs)
        if name in ("max_pool2d", "max_pool2d_with_indices"):
            x = _arg(args, kwargs, 0, "input")
            y = _avg_like_max(x, _arg(args, kwargs, 1, "kernel_size"), _arg(args, kwargs, 2, "stride", None),
                              _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1),
                              bool(_arg(args, kwargs, 5, "ceil_mode", False)))
            if _arg(args, kwargs, 6, "return_indices", False) or name == "max_pool2d_with_indices":
                return y, torch.zeros(y.shape, dtype=torch.long, device=y.device)
            return y
        if name == "adaptive_max_pool2d":
            y = F.adaptive_avg_pool2d(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "output_size"))
            if _arg(args, kwargs, 2, "return_indices", False):
                return y, torch.zeros(y.shape, dtype=torch.long, device=y.device)
            return y
        return func(*args, **kwargs)


def _support(grad: torch.Tensor):
    """(row_lo, row_hi, col_lo, col_hi) of the nonzero pixels of a (C, H, W) gradient, or None."""
    nz = (grad != 0).any(0)
    rows = torch.nonzero(nz.any(1)).flatten()
    cols = torch.nonzero(nz.any(0)).flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _empirical(module: nn.Module, ref: LayerRef, hw, in_channels, *, select=None, max_grow: int = 3):
    from .capture import run_to_layer

    lin = copy.deepcopy(module).to(torch.float64).eval()
    _, device = _probe_dtype_device(lin)
    size = tuple(hw)
    prev_hw = None
    for attempt in range(max_grow + 1):
        x = torch.ones(2, in_channels, *size, dtype=torch.float64, device=device, requires_grad=True)
        with torch.enable_grad(), _LinearMode():
            out = run_to_layer(lin, x, ref.key, select=select)
        if out.dim() != 4:
            raise ValueError(f"layer {ref.key!r} output has shape {tuple(out.shape)}; a receptive field "
                             "needs a (N, C, H, W) map")
        h, w = out.shape[-2:]
        last = attempt == max_grow
        if (h < 2 or w < 2) and not last and (h, w) != prev_hw:
            # too small a map for two units; grow (unless growing did not change it: global pool)
            prev_hw = (h, w)
            size = (size[0] * 2, size[1] * 2)
            continue
        if (h, w) == prev_hw:
            last = True
        ci, cj = max((h - 2) // 2, 0), max((w - 2) // 2, 0)
        target = out[0, :, ci, cj].sum()
        if h >= 2 and w >= 2:
            target = target + out[1, :, ci + 1, cj + 1].sum()
        (grad,) = torch.autograd.grad(target, x, allow_unused=True)
        if grad is None:
            raise ValueError(f"layer {ref.key!r} does not depend on the input; no receptive field")
        s0 = _support(grad[0])
        if s0 is None:
            raise ValueError(f"layer {ref.key!r}: unit gradient is zero everywhere; no receptive field")
        s1 = _support(grad[1]) if h >= 2 and w >= 2 else None
        full = (0, size[0] - 1, 0, size[1] - 1)
        if s0 == full and (s1 is None or s1 == full):
            if last:
                return GLOBAL
            size = (size[0] * 2, size[1] * 2)
            continue
        touches = any(s is not None and (s[0] == 0 or s[1] == size[0] - 1 or s[2] == 0 or s[3] == size[1] - 1)
                      for s in (s0, s1))
        if (touches or s1 is None) and not last:
            size = (size[0] * 2, size[1] * 2)
            continue
        if touches or s1 is None:
            raise ValueError(f"layer {ref.key!r}: receptive field did not fit a {size} probe input")
        jh, jw = s1[0] - s0[0], s1[2] - s0[2]
        sh, sw = s0[1] - s0[0] + 1, s0[3] - s0[2] + 1
        return ((sh, jh, s0[0] - ci * jh), (sw, jw, s0[2] - cj * jw))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
_METHODS = ("auto", "analytic", "empirical")


def receptive_fields(model, layers: Sequence[str] | None = None, *, input_size=224, in_channels: int = 3,
                     select=None, method: str = "auto", ignore_global: bool = False) -> dict[str, Field]:
    """Receptive fields of several layers at once (one analytic forward pass for all of them).

    ``layers=None`` means every module call with a 4-D output. Returns ``{key: Field}`` with
    keys as in :func:`vizlearn.capture` (``name`` or ``name:k``). See :func:`receptive_field`.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if ignore_global and method == "empirical":
        raise ValueError("ignore_global=True needs the analytic method")
    module = unwrap_model(model)
    hw = _hw(input_size)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    explicit = layers is not None
    if isinstance(layers, (str, LayerRef)):
        layers = [layers]
    refs = [resolve_layer(module, n) for n in layers] if explicit else None
    geoms = {}
    if method != "empirical":
        geoms = _analytic_all(module, hw, in_channels, select=select, ignore_global=ignore_global)
    if refs is None:
        if method == "empirical":
            raise ValueError("method='empirical' needs an explicit list of layers")
        refs = [resolve_layer(module, k) for k, g in geoms.items() if g not in ("nonspatial",)
                and not (isinstance(g, tuple) and g and g[0] == "error")]
    out = {}
    for ref in refs:
        key = ref.key
        if method == "empirical":
            g = _empirical(module, ref, hw, in_channels, select=select)
        else:
            if key not in geoms:
                raise ValueError(f"layer {key!r} never ran during the forward pass (a module that is not "
                                 "used by forward(), or a ':k' call index beyond the number of calls)")
            g = geoms[key]
            if isinstance(g, tuple) and g and g[0] == "error":
                raise TypeError(g[1])
            if g == "nonspatial":
                raise ValueError(f"layer {key!r} does not output a (N, C, H, W) map; receptive fields are "
                                 "defined for spatial layers only")
            if g == UNKNOWN:
                if method == "auto":
                    g = _empirical(module, ref, hw, in_channels, select=select)
                elif explicit:
                    raise ValueError(f"layer {key!r}: the analytic walk met an op it cannot compose "
                                     "(interpolation, transposed conv, ...); use method='empirical'")
                else:
                    continue  # layers=None with method="analytic": leave out what it cannot compose
        out[key] = _to_field(g, hw)
    return out


def receptive_field(model, layer: str, *, input_size=224, in_channels: int = 3, select=None,
                    method: str = "auto", ignore_global: bool = False) -> Field:
    """Receptive field (size, jump, start) of the units of ``layer`` for ``input_size`` inputs.

    ``model``: an ``nn.Module`` or a LoadedModel; ``layer``: any name accepted by
    :func:`vizlearn.layers.resolve_layer`; ``input_size``: side or ``(H, W)`` of the input
    (``start`` can depend on it with TF-style "same" padding); ``select``: picks the tensor of
    a layer with a tuple/dict output. ``method``: "auto" | "analytic" | "empirical" (see the
    module docstring). The model is left untouched. Raises ``ValueError`` for layers without a
    (N, C, H, W) output or that never run.
    """
    ref = resolve_layer(unwrap_model(model), layer)
    return receptive_fields(model, [ref], input_size=input_size, in_channels=in_channels, select=select,
                            method=method, ignore_global=ignore_global)[ref.key]


def unit_box(field: Field, position, image_hw) -> tuple[int, int, int, int]:
    """Box ``(y0, x0, y1, x1)`` (half-open, input pixels) of unit ``position=(row, col)``, clipped
    to an image of size ``image_hw=(H, W)``. Empty boxes (a field fully outside) have y0 == y1."""
    y0, x0, y1, x1 = _raw_box(field, position)
    H, W = int(image_hw[0]), int(image_hw[1])
    y0c, y1c = min(max(y0, 0), H), min(max(y1, 0), H)
    x0c, x1c = min(max(x0, 0), W), min(max(x1, 0), W)
    return (y0c, x0c, max(y1c, y0c), max(x1c, x0c))


def _raw_box(field: Field, position):
    if not isinstance(field, Field):
        raise TypeError(f"field must be a vizlearn Field, got {type(field).__name__}")
    if len(position) != 2:
        raise ValueError(f"position must be (row, col), got {position!r}")
    r, c = int(position[0]), int(position[1])
    y0 = int(round(field.start[0] + r * field.jump[0] - (field.size[0] - 1) / 2))
    x0 = int(round(field.start[1] + c * field.jump[1] - (field.size[1] - 1) / 2))
    return y0, x0, y0 + int(field.size[0]), x0 + int(field.size[1])


def crop_patch(image_hwc: np.ndarray, field: Field, position, *, fill=np.nan) -> np.ndarray:
    """The receptive field of unit ``position`` cut out of ``image_hwc`` (HWC or HW array).

    Always returns exactly ``field.size`` (plus the channel axis if any); pixels of the field
    that lie outside the image are set to ``fill``. The default NaN marks padding explicitly
    (plot code draws NaN as a grey checkerboard); pass e.g. ``fill=0.5`` for a flat grey.
    Integer images are converted to float32 when ``fill`` is NaN.
    """
    img = np.asarray(image_hwc)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be HW or HWC, got shape {img.shape}")
    y0, x0, y1, x1 = _raw_box(field, position)
    H, W = img.shape[:2]
    dtype = img.dtype
    if isinstance(fill, float) and np.isnan(fill) and not np.issubdtype(dtype, np.floating):
        dtype = np.float32
    out = np.full((y1 - y0, x1 - x0) + img.shape[2:], fill, dtype=dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out
