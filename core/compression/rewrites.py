"""Structural rewrites: functions that change a model's modules, registered by kind.

A step that changes structure calls `apply_rewrite(state, Rewrite(...))`, which runs the function on the live
model and records the rewrite; `load_compressed` replays the recorded rewrites, in order, on a freshly built model
so that the saved weights fit it. One function serves both, so the saved and the loaded model cannot disagree.
"""

from collections.abc import Callable
from typing import Any

from torch import nn

from core.compression.registry import load_step_modules
from core.compression.state import ModelState, Rewrite
from core.errors import UnsupportedModel

RewriteFn = Callable[[nn.Module, str, dict[str, Any]], None]
_REWRITES: dict[str, RewriteFn] = {}


def register_rewrite(kind: str) -> Callable[[RewriteFn], RewriteFn]:
    """Decorator: `@register_rewrite("factor_linear")` on `fn(model, module_name, meta)` that mutates `model`."""

    def decorate(fn: RewriteFn) -> RewriteFn:
        if kind in _REWRITES:
            raise RuntimeError(f"rewrite {kind!r} is already registered")
        _REWRITES[kind] = fn
        return fn

    return decorate


def apply_rewrite(state: ModelState, rewrite: Rewrite) -> None:
    """Change the live model and record the change for the artifact."""
    replay(state.model, rewrite)
    state.rewrites.append(rewrite)


def replay(model: nn.Module, rewrite: Rewrite) -> None:
    load_step_modules()
    fn = _REWRITES.get(rewrite.kind)
    if fn is None:
        raise UnsupportedModel(f"unknown structural rewrite {rewrite.kind!r} (written by a newer version?)")
    fn(model, rewrite.module, rewrite.meta)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
