"""One small adapter per method: the only place the sweep calls a method's public function.

An adapter takes (model, task, params) and returns a `MethodOutput`: a circuit over the model's graph (the
discovery methods), per-component scores (activation patching), and the method's own numbers. The runner
then adds what every circuit gets: its size, its faithfulness and its ROC against a known circuit.
Register another method with `register_method(name)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from transformer_lens import TransformerBridge

from circuits.graph.circuit import Circuit
from circuits.tasks.task import Task


@dataclass(frozen=True)
class MethodOutput:
    """What a method run produced: `circuit` (None for methods that score components, not edges),
    `scores` (a JSON-ready dict for component scores: dims, labels, values) and `metrics` (named numbers)."""

    circuit: Circuit | None = None
    scores: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


Adapter = Callable[[TransformerBridge, Task, Mapping[str, Any]], MethodOutput]
_ADAPTERS: dict[str, Adapter] = {}


def register_method(name: str) -> Callable[[Adapter], Adapter]:
    """Register an adapter (model, task, params) → MethodOutput under `name` (a decorator).
    Example: `@register_method("my-method")` above `def run(model, task, params): return MethodOutput(...)`"""
    def decorate(fn: Adapter) -> Adapter:
        _ADAPTERS[name] = fn
        return fn
    return decorate


def adapter(method: str) -> Adapter:
    if method not in _ADAPTERS:
        raise ValueError(f"method: unknown method {method!r}; expected one of {sorted(_ADAPTERS)}")
    return _ADAPTERS[method]


def _take(params: Mapping[str, Any], allowed: dict[str, Any], method: str) -> dict[str, Any]:
    """`allowed` (name → default) filled from `params`; a ValueError naming any parameter the method lacks."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{method}: unknown parameters {unknown}; expected some of {sorted(allowed)}")
    return {**allowed, **params}


_DEFAULT = object()  # a parameter left to the method's own default


def _given(p: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: p[n] for n in names if p[n] is not _DEFAULT}


@register_method("acdc")
def _acdc(model: TransformerBridge, task: Task, params: Mapping[str, Any]) -> MethodOutput:
    from circuits.graph import acdc

    p = _take(params, dict(threshold=_DEFAULT, metric=_DEFAULT, ablation=_DEFAULT, mode=_DEFAULT,
                           order=_DEFAULT), "acdc")
    if p["threshold"] is _DEFAULT:
        raise ValueError("acdc: the parameter 'threshold' is required")
    r = acdc(model, task, progress=False, **_given(p, "threshold", "metric", "ablation", "mode", "order"))
    return MethodOutput(r.circuit, metrics=dict(n_forwards=r.n_forwards, acdc_loss=r.info["loss"]))


def _eap_run(model: TransformerBridge, task: Task, params: Mapping[str, Any], method: str, ig_default: int
             ) -> MethodOutput:
    from circuits.graph import eap

    p = _take(params, dict(top_n=_DEFAULT, threshold=_DEFAULT, ig_steps=ig_default, metric=_DEFAULT,
                           ablation=_DEFAULT), method)
    if (p["top_n"] is _DEFAULT) == (p["threshold"] is _DEFAULT):
        raise ValueError(f"{method}: give exactly one of 'top_n' (the n best edges) or 'threshold' (|score| above)")
    if method == "eap-ig" and p["ig_steps"] < 1:
        raise ValueError(f"eap-ig: ig_steps must be >= 1, got {p['ig_steps']!r}")
    r = eap(model, task, **_given(p, "ig_steps", "metric", "ablation"))
    full = r.circuit
    circuit = full.top_n(p["top_n"]) if p["top_n"] is not _DEFAULT else full.above(p["threshold"])
    return MethodOutput(circuit.with_members(circuit.members, method=method))


@register_method("eap")
def _eap(model: TransformerBridge, task: Task, params: Mapping[str, Any]) -> MethodOutput:
    return _eap_run(model, task, params, "eap", 0)


@register_method("eap-ig")
def _eap_ig(model: TransformerBridge, task: Task, params: Mapping[str, Any]) -> MethodOutput:
    return _eap_run(model, task, params, "eap-ig", 8)


@register_method("faithfulness")
def _faithfulness(model: TransformerBridge, task: Task, params: Mapping[str, Any]) -> MethodOutput:
    """The faithfulness of a given circuit: `circuit="known"` (the model's known circuit) or a path to a
    circuit's JSON (`Circuit.save`). The runner scores it like any other circuit."""
    from circuits.sweep.build import known_circuit

    p = _take(params, dict(circuit="known", ablation=_DEFAULT), "faithfulness")
    if p["circuit"] == "known":
        circuit = known_circuit(model)
        if circuit is None:
            raise ValueError("faithfulness: circuit='known', but this model has no known circuit")
    else:
        circuit = Circuit.load(p["circuit"])
    if p["ablation"] is not _DEFAULT:
        circuit = circuit.with_members(circuit.members, ablation=str(p["ablation"]))
    return MethodOutput(circuit)


@register_method("activation_patching")
def _activation_patching(model: TransformerBridge, task: Task, params: Mapping[str, Any]) -> MethodOutput:
    from circuits.activations import activation_patch

    p = _take(params, dict(site="z", per_position=False, direction=_DEFAULT), "activation_patching")
    r = activation_patch(model, task, p["site"], per_position=p["per_position"], progress=False,
                         **_given(p, "direction"))
    values = r.values.double()
    scores = dict(dims=list(r.dims), labels=[list(x) for x in r.labels], values=values.tolist(),
                  site=r.site, direction=r.direction, metric=r.metric)
    finite = values[values.isfinite()]
    top = r.top(1)
    metrics = dict(clean_metric=r.clean_metric, corrupted_metric=r.corrupted_metric,
                   max_patched=float(finite.max()) if finite.numel() else float("nan"),
                   top_component="/".join(top[0][0]) if top else None)
    return MethodOutput(scores=scores, metrics=metrics)
