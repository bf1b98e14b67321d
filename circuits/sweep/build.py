"""Building a run's model and task from its grid entries, the digests that key its results, and known circuits.

Builders and task generators are found by name: first those registered with `register_model` /
`register_task`, then the zoo (models only) and the functions of `circuits.models` / `circuits.tasks`.
A process keeps the models it built (`build_model` caches by entry), so a worker builds each model once.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable

import torch
from transformer_lens import TransformerBridge

from circuits.digest import canonical_json, weights_digest
from circuits.graph.circuit import Circuit
from circuits.graph.nodes import ComputeGraph
from circuits.sweep.grid import ModelEntry, TaskEntry
from circuits.tasks.task import Task

_MODEL_BUILDERS: dict[str, Callable[..., TransformerBridge]] = {}
_TASK_GENERATORS: dict[str, Callable[..., Task]] = {}
_MODELS: dict[str, tuple[TransformerBridge, str]] = {}


def register_model(name: str) -> Callable[[Callable[..., TransformerBridge]], Callable[..., TransformerBridge]]:
    """Register a model builder under `name` (a decorator); `ModelEntry(label, builder=name, params=...)` calls
    it with `params`. Example: `@register_model("my-model")` above `def build(d_vocab=32): ...`"""
    def decorate(fn: Callable[..., TransformerBridge]) -> Callable[..., TransformerBridge]:
        _MODEL_BUILDERS[name] = fn
        return fn
    return decorate


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Register a task generator under `name` (a decorator); it is called with the entry's params, plus
    `seed=` and `d_vocab=` where it takes them. Example: `@register_task("my-task")`"""
    def decorate(fn: Callable[..., Task]) -> Callable[..., Task]:
        _TASK_GENERATORS[name] = fn
        return fn
    return decorate


def import_modules(names: Iterable[str], paths: Iterable[str] = ()) -> None:
    """Import the modules that register custom builders (in a Ray worker: with the driver's sys.path)."""
    for p in paths:
        if p not in sys.path:
            sys.path.append(p)
    for name in names:
        importlib.import_module(name)


def model_builder(entry: ModelEntry) -> Callable[..., TransformerBridge]:
    """The function that builds `entry`'s model (the zoo's loader for a bare zoo name)."""
    b = entry.builder
    if callable(b):
        return b
    if b is None:
        from circuits.models.zoo import NAMES, load_pretrained

        if entry.name not in NAMES:
            raise ValueError(f"model {entry.name!r}: not a zoo model ({list(NAMES)}); give a builder")
        return lambda: load_pretrained(entry.name)
    return _find(b, _MODEL_BUILDERS, "circuits.models", f"model {entry.name!r}: unknown builder", "register_model")


def build_model(entry: ModelEntry) -> tuple[TransformerBridge, str]:
    """The entry's model (eval mode) and its weights' digest, built once per process."""
    key = canonical_json(entry.describe()) + (f"#{id(entry.builder)}" if callable(entry.builder) else "")
    if key not in _MODELS:
        model = model_builder(entry)(**dict(entry.params))
        if not isinstance(model, TransformerBridge):
            raise ValueError(f"model {entry.name!r}: the builder returned {type(model).__name__}, "
                             f"expected a TransformerBridge")
        model.eval()
        _MODELS[key] = (model, weights_digest(model))
    return _MODELS[key]


def task_generator(entry: TaskEntry) -> Callable[..., Task]:
    """The function that makes `entry`'s task."""
    g = entry.generator
    if callable(g):
        return g
    return _find(g, _TASK_GENERATORS, "circuits.tasks", f"task {entry.name!r}: unknown generator", "register_task")


def _find(name: str, registry: dict[str, Callable], module: str, what: str, register: str) -> Callable:
    """A registered function, else a public function of `module`; a ValueError saying where it was looked for."""
    if name in registry:
        return registry[name]
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None or not callable(fn) or name.startswith("_"):
        raise ValueError(f"{what} {name!r}; register it with circuits.sweep.{register} or name a function of "
                         f"{module}")
    return fn


def build_task(entry: TaskEntry, model: TransformerBridge, seed: int) -> Task:
    """The entry's task for `model` and `seed` (passed as `seed=` / `d_vocab=` where the generator takes them)."""
    fn = task_generator(entry)
    params = dict(entry.params)
    accepted = inspect.signature(fn).parameters
    if "seed" in accepted and "seed" not in params:
        params["seed"] = seed
    if "d_vocab" in accepted and "d_vocab" not in params:
        params["d_vocab"] = model.cfg.d_vocab
    task = fn(**params)
    if not isinstance(task, Task):
        raise ValueError(f"task {entry.name!r}: the generator returned {type(task).__name__}, expected a Task")
    return task


def known_circuit(model: TransformerBridge) -> Circuit | None:
    """The circuit a model is known to compute by construction, or None.

    A model may carry one as `model.known_circuit` (a Circuit, or a callable of the model returning one); the
    planted induction model's (`model.planted`) is built from its heads: the previous-token head reads the
    positions on q and k and the token on v, the induction head reads the token on q and v and the
    previous-token head's output on k, and writes the logits (7 edges)."""
    known = getattr(model, "known_circuit", None)
    if known is not None:
        return known(model) if callable(known) else known
    planted = getattr(model, "planted", None)
    if planted is None:
        return None
    (lp, hp), (li, hi) = planted.previous_token, planted.induction
    prev, ind = f"L{lp}H{hp}", f"L{li}H{hi}"
    edges = [("pos_embed", f"{prev}.q"), ("pos_embed", f"{prev}.k"), ("tok_embed", f"{prev}.v"),
             ("tok_embed", f"{ind}.q"), (prev, f"{ind}.k"), ("tok_embed", f"{ind}.v"), (ind, "logits")]
    graph = ComputeGraph.of(model)
    members = torch.zeros_like(graph.valid)
    for src, dst in edges:
        e = graph.edge(src, dst)
        members[e.src, e.dst] = True
    return Circuit.full(graph).with_members(members, method="known")
