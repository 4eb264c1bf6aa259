"""Leave the caller's model exactly as found.

vizlearn runs its analysis in eval mode and sometimes has to switch in-place rectifiers to
out-of-place (so that hooks and custom backward rules see the values they need). These
context managers make such changes and undo them in ``finally``, whatever happens inside.
"""
from __future__ import annotations

import contextlib

from torch import nn

__all__ = ["eval_mode", "no_inplace", "analysis_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode; restore each module's own ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def no_inplace(model: nn.Module):
    """Set ``inplace=False`` on every module that has an ``inplace`` flag; restore afterwards."""
    changed = []
    try:
        for m in model.modules():
            if getattr(m, "inplace", False) is True:
                changed.append(m)
                m.inplace = False
        yield model
    finally:
        for m in changed:
            m.inplace = True


@contextlib.contextmanager
def analysis_mode(model: nn.Module):
    """Eval mode and no in-place ops, both restored on exit."""
    with eval_mode(model), no_inplace(model):
        yield model
