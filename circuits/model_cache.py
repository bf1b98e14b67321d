"""Values read from a model's weights, cached per model until a parameter or buffer changes.

A cached value is reused while every parameter and buffer has the same storage, shape, device and version
counter as when it was read: replacing a parameter or changing one in place through an autograd-visible
operation (`p.add_(...)`, `p.copy_(...)`, an optimiser step) invalidates it. Writes through `.data` bypass
the version counter; callers offer a way to read afresh for those.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import TypeVar

from torch import nn

T = TypeVar("T")

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_read(model: nn.Module, kind: str, read: Callable[[nn.Module], T]) -> T:
    """`read(model)`, reused for the same `kind` while the model's weights are unchanged.
    Example: `w = cached_read(model, "activations", Weights.read)`"""
    key = weights_key(model)
    per_model = _CACHE.setdefault(model, {})
    hit = per_model.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = read(model)
    per_model[kind] = (key, value)
    return value


def weights_key(model: nn.Module) -> tuple:
    """Storage, version, shape and device of every parameter and buffer: equal while nothing was changed.
    Example: `weights_key(model) == weights_key(model)`"""
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.device.type)
                 for t in itertools.chain(model.parameters(), model.buffers()))
