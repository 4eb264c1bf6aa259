"""Project a unit's activation back to pixel space: deconvnet, guided backprop, gradient.

The Zeiler & Fergus (2014) deconvnet of a unit equals a backward pass from that unit in which

* every **rectifier**'s backward is replaced by a rule (the rest of the network keeps its ordinary
  backward):

  =============  ==============================================  =====================================
  method         ReLU / ReLU6 / hardtanh(0, m)                    LeakyReLU(a) / PReLU(a)
  =============  ==============================================  =====================================
  ``deconvnet``  ``relu(g)``  (the signal is rectified)           ``leaky_relu(g, a)``
  ``guided``     ``relu(g) * (x > 0)``                           ``relu(g) * where(x > 0, 1, a)``
  ``gradient``   plain autograd gradient                          plain autograd gradient
  =============  ==============================================  =====================================

  (``g`` = gradient arriving from above, ``x`` = the rectifier's forward input; with slope
  ``a = 0`` the leaky rules are exactly the ReLU ones). The rule is applied wherever the op runs:
  modules (``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh(0, m)``, ``nn.LeakyReLU``, ``nn.PReLU``; PReLU's
  weight is read, never changed), functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``,
  ``relu_``, ``F.relu6``, ``F.hardtanh``, ``F.leaky_relu``, ``torch.prelu``), in-place variants,
  and modules that run several times per forward (each call gets the rule). This is done with a
  :class:`torch.overrides.TorchFunctionMode` active during the forward pass: module calls end in
  the same ``F.*`` functions, so one mode covers both.

  **ReLU6 / hardtanh(0, m) upper clip**: it is *ignored* by the ``deconvnet`` and ``guided`` rules
  (the unit counts as "on" when ``x > 0``, also when saturated at 6). The strongest activations of
  a ReLU6 net are the saturated ones; a mask that blocked them would erase exactly the signal the
  projection is meant to show. ``method="gradient"`` keeps the true (zero) gradient above the clip.
  ``hardtanh`` with a lower bound other than 0 is not a rectifier (no clean rule, see below).
* **max-pool** backward is switch unpooling (the gradient goes to the recorded argmax); with
  overlapping windows contributions that land on the same pixel are summed.
* **conv** backward is the transposed filter (``conv_transpose2d`` with the same weights, no bias).
* eval-mode BatchNorm (a per-channel scale), residual additions, concatenation, average pooling,
  dropout in eval mode, linear layers, padding, flatten: their ordinary backward.

**Activations without a clean rule** (SiLU/Swish, GELU, Hardswish, Mish, ELU, SELU, Softplus,
sigmoid and tanh, including sigmoid gates such as squeeze-excitation): the plain gradient flows
through them, and one warning per call names the modules/ops that ran. ``clamp(min=0)`` is not
recognised as a rectifier (plain gradient, no warning).

Every method seeds the backward pass with the chosen activation's own value (all other activations
of the layer zero), so a unit whose activation is 0 (a dead filter) projects to exact zeros; this is
reported with a warning, never NaN.

Cost: the forward pass stops at the target layer. Units are packed into rows (one row = one copy
of an image); units of the same row share its forward pass and are back-propagated in successive
rounds (``retain_graph``), and one backward per round carries one unit of every row at once
(independent selections summed: rows of an eval-mode CNN do not interact). How many copies of an
image to make is chosen to minimise forward + backward work; at most ``chunk`` rows are alive at a
time. Results equal projecting one unit at a time.

Nothing given is changed: the model runs in :func:`vizlearn.state.analysis_mode` (eval mode,
in-place modules switched to out-of-place, both restored), the gradient is taken with
``torch.autograd.grad`` w.r.t. a private copy of the input (parameters' ``.grad`` and the caller's
tensors are untouched). Works inside ``torch.no_grad()``; inside ``torch.inference_mode()`` it
raises ``RuntimeError``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._display import signed_display
from .capture import run_to_layer, select_output
from .layers import module_device, unwrap_model
from .state import analysis_mode

__all__ = ["project", "project_units", "display_projection", "METHODS"]

METHODS = ("deconvnet", "guided", "gradient")

# --------------------------------------------------------------------------------------------
# The rectifier rule


class _Rectify(torch.autograd.Function):
    """Forward = the original op; backward = the deconvnet / guided rule."""

    @staticmethod
    def forward(ctx, x, slope, op, method, inplace):
        pos = x > 0
        out = op(x)
        if inplace:
            ctx.mark_dirty(x)
        ctx.method = method
        ctx.has_slope = slope is not None
        ctx.save_for_backward(pos, *([slope] if slope is not None else []))
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.has_slope:
            pos, slope = ctx.saved_tensors
        else:
            (pos,), slope = ctx.saved_tensors, None
        if ctx.method == "deconvnet":
            gi = g.clamp_min(0) if slope is None else torch.where(g > 0, g, g * slope)
        else:  # guided
            gp = g.clamp_min(0)
            gi = gp * pos if slope is None else gp * torch.where(pos, torch.ones_like(gp), slope)
        return gi, None, None, None, None


def _arg(args, kwargs, i, name, default):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _channel_slope(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = w.detach()
    if w.numel() == 1 or x.dim() < 2:
        return w.reshape(())
    return w.reshape((1, -1) + (1,) * (x.dim() - 2))


# func -> parser(args, kwargs) -> (x, slope or None, inplace) or None when this call is no rectifier
def _p_relu(inplace_default=False, inplace_kw=False):
    def parse(args, kwargs):
        inplace = bool(_arg(args, kwargs, 1, "inplace", False)) if inplace_kw else inplace_default
        return _arg(args, kwargs, 0, "input", None), None, inplace
    return parse


def _p_hardtanh(inplace_default=False):
    def parse(args, kwargs):
        lo = _arg(args, kwargs, 1, "min_val", -1.0)
        hi = _arg(args, kwargs, 2, "max_val", 1.0)
        inplace = inplace_default or bool(_arg(args, kwargs, 3, "inplace", False))
        if float(lo) != 0.0 or float(hi) <= 0.0:
            return None
        return _arg(args, kwargs, 0, "input", None), None, inplace
    return parse


def _p_leaky(inplace_default=False):
    def parse(args, kwargs):
        x = _arg(args, kwargs, 0, "input", None)
        a = float(_arg(args, kwargs, 1, "negative_slope", 0.01))
        inplace = inplace_default or bool(_arg(args, kwargs, 2, "inplace", False))
        return x, torch.tensor(a, dtype=x.dtype, device=x.device), inplace
    return parse


def _p_prelu(args, kwargs):
    x = _arg(args, kwargs, 0, "input", None)
    w = _arg(args, kwargs, 1, "weight", None)
    return x, _channel_slope(w, x), False


_RECTIFIERS = {
    F.relu: _p_relu(inplace_kw=True),
    torch.relu: _p_relu(),
    torch.Tensor.relu: _p_relu(),
    torch.relu_: _p_relu(True),
    torch.Tensor.relu_: _p_relu(True),
    F.relu6: _p_relu(inplace_kw=True),
    F.hardtanh: _p_hardtanh(),
    F.hardtanh_: _p_hardtanh(True),
    F.leaky_relu: _p_leaky(),
    F.leaky_relu_: _p_leaky(True),
    torch.prelu: _p_prelu,
}
for _name in ("relu6", "hardtanh", "leaky_relu"):
    if hasattr(torch._C._nn, _name):
        _f = getattr(torch._C._nn, _name)
        _RECTIFIERS.setdefault(_f, {"relu6": _p_relu(), "hardtanh": _p_hardtanh(), "leaky_relu": _p_leaky()}[_name])
if hasattr(torch.Tensor, "prelu"):
    _RECTIFIERS.setdefault(torch.Tensor.prelu, _p_prelu)

_NO_RULE = {}
for _mod, _names in (
    (F, ("silu", "gelu", "hardswish", "mish", "elu", "elu_", "selu", "selu_", "celu", "celu_", "softplus",
         "hardsigmoid", "logsigmoid", "glu", "tanhshrink", "softsign", "rrelu", "rrelu_")),
    (torch, ("sigmoid", "sigmoid_", "tanh", "tanh_", "rrelu", "rrelu_", "celu", "selu", "selu_")),
    (torch.Tensor, ("sigmoid", "sigmoid_", "tanh", "tanh_")),
    (torch._C._nn, ("gelu", "silu", "silu_", "hardswish", "hardswish_", "mish", "mish_", "elu", "elu_",
                    "softplus", "hardsigmoid", "hardsigmoid_", "log_sigmoid")),
):
    for _n in _names:
        _f = getattr(_mod, _n, None)
        if _f is not None:
            _NO_RULE.setdefault(_f, _n)


def _op_name(func) -> str:
    return getattr(func, "__name__", repr(func))


class _RuleMode(TorchFunctionMode):
    """Replace rectifier calls by :class:`_Rectify`; record ops that have no clean rule."""

    def __init__(self, method: str, tracker: "_ModuleStack"):
        super().__init__()
        self.method = method
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        parse = _RECTIFIERS.get(func)
        if parse is not None:
            parsed = parse(args, kwargs)
            if parsed is None:
                self.tracker.note(f"{_op_name(func)}({', '.join(map(str, args[1:3]))})")
            else:
                x, slope, inplace = parsed
                if torch.is_tensor(x) and torch.is_grad_enabled() and x.requires_grad:
                    def op(t, _f=func, _a=args[1:], _k=kwargs):
                        return _f(t, *_a, **_k)
                    return _Rectify.apply(x, slope, op, self.method, inplace)
        elif func in _NO_RULE:
            self.tracker.note(_NO_RULE[func])
        return func(*args, **kwargs)


class _ModuleStack:
    """Forward pre/post hooks on every submodule: which module is running (for warnings)."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.found: dict[str, None] = {}
        self.handles = []
        for name, m in model.named_modules():
            label = f"{name or '<model>'} ({type(m).__name__})"
            self.handles.append(m.register_forward_pre_hook(self._push(label)))
            self.handles.append(m.register_forward_hook(self._pop))

    def _push(self, label):
        def hook(module, inputs):
            self.stack.append(label)
        return hook

    def _pop(self, module, inputs, output):
        if self.stack:
            self.stack.pop()

    def note(self, op: str):
        where = self.stack[-1] if self.stack else "<model>"
        self.found.setdefault(f"{op} in {where}", None)

    def reset(self):
        self.stack.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# Input checks


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_modes():
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "vizlearn projections need autograd, which torch.inference_mode() switches off; call it "
            "outside the inference_mode block (inside torch.no_grad() is fine)"
        )


def _as_images(model, images) -> torch.Tensor:
    if not torch.is_tensor(images):
        if hasattr(images, "images") and hasattr(model, "mean"):  # ImageSet + LoadedModel
            from .images import to_tensor
            images = to_tensor(images.images, mean=model.mean, std=model.std)
        elif isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        else:
            raise TypeError(f"images must be a Tensor (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be a batch (N, C, H, W), got shape {tuple(images.shape)}; "
                         "use x[None] for a single image")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (normalised model input), got {images.dtype}")
    return images


# --------------------------------------------------------------------------------------------
# Planning: rows and rounds


def _plan(groups: dict[int, list[int]], chunk: int) -> list[list[tuple[int, list[int]]]]:
    """Split the units of each image over copies (rows); pack rows into batches of <= chunk rows.

    Cost of ``R`` rounds: rows(R) forwards + R * rows(R) backwards (an input-only backward ~ 1.1 forward, measured on resnet18).
    """
    counts = [len(v) for v in groups.values()]
    best_r, best_cost = 1, math.inf
    for r in range(1, max(counts) + 1):
        rows = sum(math.ceil(c / r) for c in counts)
        cost = rows * (1.0 + 1.1 * r)
        if cost < best_cost - 1e-9:
            best_r, best_cost = r, cost
    rows = []
    for img, us in groups.items():
        for start in range(0, len(us), best_r):
            rows.append((img, us[start:start + best_r]))
    rows.sort(key=lambda row: -len(row[1]))
    return [rows[i:i + chunk] for i in range(0, len(rows), chunk)]


def _forward(module, x, layer, select, output_select):
    if layer is None or layer == "":
        return select_output(module(x), output_select, where="model output")
    if output_select is not None:
        raise ValueError("output_select= picks a part of the *model* output and is only used with layer=None; "
                         "for a layer whose output is a tuple/dict use select=")
    return run_to_layer(module, x, layer, select=select)


def _run(model, images, layer, units, *, method, chunk, select, output_select, where):
    """units: list of (image, channel, position or None). Returns (proj (U,C,H,W), values (U,))."""
    _check_method(method)
    _check_modes()
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    module = unwrap_model(model)
    if method != "gradient" and any(isinstance(m, torch.jit.ScriptModule) for m in module.modules()):
        raise TypeError("TorchScript modules hide their rectifiers from vizlearn's backward rules; pass the "
                        "eager nn.Module (or use method='gradient')")
    images = _as_images(model, images)
    n = images.shape[0]
    for i, (img, _, _) in enumerate(units):
        if not (-n <= img < n):
            raise ValueError(f"{where}: image index {img} out of range for {n} images")
    device = module_device(module, images.device)
    base = images.detach().to(device).clone()  # private copy: the caller's tensor is never touched
    out_proj = torch.zeros((len(units),) + tuple(images.shape[1:]), dtype=images.dtype, device=device)
    values = torch.zeros(len(units), dtype=torch.float64)
    groups: dict[int, list[int]] = {}
    for u, (img, _, _) in enumerate(units):
        groups.setdefault(img % n, []).append(u)
    if not units:
        return out_proj.to(images.device), values
    batches = _plan(groups, chunk)
    tracker = _ModuleStack(module) if method != "gradient" else None
    try:
        with analysis_mode(module), torch.enable_grad():
            for batch in batches:
                idx = torch.tensor([img for img, _ in batch], device=device)
                x = base.index_select(0, idx).requires_grad_(True)
                if tracker is not None:
                    tracker.reset()
                    with _RuleMode(method, tracker):
                        act = _forward(module, x, layer, select, output_select)
                else:
                    act = _forward(module, x, layer, select, output_select)
                if not act.requires_grad:
                    raise RuntimeError(f"{where}: the output of layer {layer!r} does not depend on the input "
                                       "through autograd (detached inside the model?)")
                if act.dim() < 2:
                    raise ValueError(f"{where}: layer output has shape {tuple(act.shape)}; expected (N, C, ...)")
                spatial = tuple(act.shape[2:])
                rounds = max(len(us) for _, us in batch)
                picks = []  # per round: list of (row, unit, index tuple)
                for r in range(rounds):
                    cur = []
                    for row, (img, us) in enumerate(batch):
                        if r >= len(us):
                            continue
                        u = us[r]
                        _, ch, pos = units[u]
                        ch = int(ch)
                        if not (0 <= ch < act.shape[1]):
                            raise ValueError(f"{where}: channel {ch} out of range; layer {layer!r} has "
                                             f"{act.shape[1]} channels")
                        if pos is None:
                            if spatial:
                                flat = int(torch.argmax(act[row, ch].detach().reshape(-1)))
                                pos = tuple(int(v) for v in np.unravel_index(flat, spatial))
                            else:
                                pos = ()
                        else:
                            try:
                                pos = tuple(int(p) for p in pos)
                            except TypeError:
                                raise ValueError(f"{where}: position {pos!r} must be a (row, col) tuple of "
                                                 "ints") from None
                            if len(pos) != len(spatial) or any(not (0 <= p < s) for p, s in zip(pos, spatial)):
                                raise ValueError(f"{where}: position {pos} does not fit the layer's spatial "
                                                 f"shape {spatial}")
                        cur.append((row, u, (row, ch) + pos))
                    picks.append(cur)
                for r, cur in enumerate(picks):
                    seed = torch.zeros_like(act)
                    for row, u, ix in cur:
                        v = act[ix].detach()
                        seed[ix] = v
                        values[u] = float(v)
                    (g,) = torch.autograd.grad(act, x, seed, retain_graph=r < len(picks) - 1,
                                               allow_unused=True)
                    if g is None:
                        raise RuntimeError(f"{where}: no gradient reached the input")
                    for row, u, _ in cur:
                        out_proj[u] = g[row].detach()
                del act, x
    finally:
        if tracker is not None:
            tracker.remove()
    if tracker is not None and tracker.found:
        names = list(tracker.found)
        shown = "; ".join(names[:8]) + (f"; ... ({len(names) - 8} more)" if len(names) > 8 else "")
        warnings.warn(
            f"{where}: no clean {method} rule for {len(names)} activation op(s) before layer {layer!r} "
            f"(plain gradient used through them): {shown}", RuntimeWarning, stacklevel=3)
    dead = int((values == 0).sum())
    if dead:
        warnings.warn(f"{where}: {dead} of {len(units)} unit(s) have activation 0 at the chosen position "
                      "(dead filter?); their projections are zeros", RuntimeWarning, stacklevel=3)
    return out_proj.to(images.device), values


# --------------------------------------------------------------------------------------------
# Public API


def _per_image(value, n, what, is_single):
    if is_single(value):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what}: got {len(value)} entries for {n} images; give one per image or a single value")
    return value


def _is_pos(p):
    """One position for all images: None, or a (row, col) tuple/list/1-D array of ints."""
    return p is None or (isinstance(p, (tuple, list, np.ndarray))
                         and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in p))


def project(model, images, layer, channel, position=None, *, method: str = "deconvnet", select=None,
            output_select=None) -> torch.Tensor:
    """Project one activation per image of ``layer`` back to pixel space.

    Args:
        model: ``nn.Module`` or :class:`vizlearn.LoadedModel`.
        images: normalised input batch ``(N, C_in, H, W)``.
        layer: module name (``"layer2"``, ``"features.3"``, ``"layer1.0.relu:1"``); ``None`` = the
            model's output (e.g. a class logit; pick tuple/dict parts with ``output_select``).
        channel: an int for all images, or one int per image.
        position: ``None`` = per image the spatial argmax of that channel; a ``(row, col)`` tuple for all
            images; or one tuple/None per image. For 2-D outputs ``(N, C)`` use ``None``/``()``.
        method: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` (guided backprop) or ``"gradient"``.
        select: picks the tensor out of a tuple/dict layer output (index, key or callable).
    Returns:
        ``(N, C_in, H, W)`` signed projections (the chosen activation keeps its value, all others 0).
    """
    imgs = _as_images(model, images)
    n = imgs.shape[0]
    if torch.is_tensor(channel):
        channel = channel.tolist()
    chans = _per_image(channel, n, "channel", lambda c: isinstance(c, (int, np.integer)))
    poss = _per_image(position, n, "position", _is_pos)
    units = [(i, int(c), p) for i, (c, p) in enumerate(zip(chans, poss))]
    proj, _ = _run(model, imgs, layer, units, method=method, chunk=max(1, n), select=select,
                   output_select=output_select, where="project")
    return proj


def project_units(model, images, layer, units, *, method: str = "deconvnet", chunk: int = 64, select=None,
                  output_select=None) -> torch.Tensor:
    """Project many units of one layer, batched; equal to calling :func:`project` once per unit.

    Args:
        units: sequence of ``(image_index, channel, (row, col))``; the position may be ``None``
            (that image's argmax of the channel).
        chunk: at most this many image copies are in one forward/backward (bounds memory).
    Returns:
        ``(U, C_in, H, W)``, in the order of ``units``.
    """
    units = list(units)
    parsed = []
    for k, u in enumerate(units):
        try:
            img, ch, pos = u
        except (TypeError, ValueError):
            raise ValueError(f"units[{k}] = {u!r}: expected (image_index, channel, (row, col))") from None
        if pos is not None:
            pos = tuple(pos)
        parsed.append((int(img), int(ch), pos))
    proj, _ = _run(model, images, layer, parsed, method=method, chunk=chunk, select=select,
                   output_select=output_select, where="project_units")
    return proj


def display_projection(proj, *, eps: float = 1e-8, percentile: float = 100.0) -> np.ndarray:
    """Signed projection -> displayable image in [0, 1], as in the paper's figures.

    Rule: ``0.5 + 0.5 * p / max(s, eps)`` over the whole image (all channels together), with
    ``s`` the ``percentile`` of ``|p|`` (default 100: the max), clipped to [0, 1]; so zero is
    mid-grey, colour balance is kept, and an all-zero projection (dead filter) is plain grey,
    never NaN. ``percentile=99`` lets the few strongest pixels saturate so that faint structure
    becomes visible (what vizlearn's panels use).

    ``proj``: ``(C, H, W)`` or ``(1, C, H, W)`` tensor/array -> ``(H, W, C)`` (``(H, W)`` for one
    channel); ``(N, C, H, W)`` with N > 1 -> ``(N, H, W, C)``, each image normalised on its own.
    """
    if torch.is_tensor(proj):
        proj = proj.detach().float().cpu().numpy()
    p = np.asarray(proj, dtype=np.float64)
    if p.ndim == 4 and p.shape[0] > 1:
        return np.stack([display_projection(q, eps=eps, percentile=percentile) for q in p])
    if p.ndim == 4:
        p = p[0]
    if p.ndim != 3:
        raise ValueError(f"expected a projection (C, H, W) or (N, C, H, W), got shape {p.shape}")
    return signed_display(p.transpose(1, 2, 0), percentile=percentile, eps=eps).astype(np.float32)
