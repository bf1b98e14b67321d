"""A sweep's grid: models × tasks × methods (with their parameters) × seeds, declared in Python or TOML.

A `Run` is one point of the grid. Its `describe()` is a JSON-ready dict of everything that names it; the
results folder keys a run by a hash of that description together with the weights' and the task data's
digests and the library versions (see `circuits.sweep.store`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("acdc", "eap", "eap-ig", "faithfulness", "activation_patching")


@dataclass(frozen=True)
class ModelEntry:
    """A model of the sweep: a zoo name (`ModelEntry("attn2l-induction")`), or a builder with its keyword
    arguments: a name registered with `circuits.sweep.register_model`, a function of `circuits.models`
    (`ModelEntry("planted", builder="planted_induction")`), or a callable returning a TransformerBridge.

    Example: `ModelEntry("tiny", builder="attn_only", params=dict(n_layers=2, d_model=32, n_heads=4, d_head=8,
    d_vocab=24, n_ctx=24))`
    """

    name: str
    builder: str | Callable[..., Any] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "builder": _callable_name(self.builder), "params": dict(self.params)}


@dataclass(frozen=True)
class TaskEntry:
    """A task of the sweep: a generator (a name registered with `circuits.sweep.register_task`, a function of
    `circuits.tasks`, or a callable returning a Task) with its keyword arguments. The run's seed is passed as
    `seed=` and the model's vocabulary as `d_vocab=` where the generator takes them and `params` does not
    set them. Example: `TaskEntry("induction", "induction_task", dict(batch=8, half_len=6))`
    """

    name: str
    generator: str | Callable[..., Any]
    params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "generator": _callable_name(self.generator), "params": dict(self.params)}


@dataclass(frozen=True)
class MethodEntry:
    """A method with fixed `params` and a `grid` of parameters to sweep (each value list is one axis).

    Methods: "acdc" (threshold, metric, ablation, mode), "eap" and "eap-ig" (top_n or threshold, ig_steps,
    metric, ablation), "faithfulness" (circuit="known"), "activation_patching" (site, per_position, direction),
    or a name registered with `circuits.sweep.register_method`.
    Example: `MethodEntry("acdc", grid={"threshold": [0.01, 0.03]}, params={"ablation": "zero"})`
    """

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Any] = field(default_factory=dict)  # values: lists, checked by `points` with a clear error

    def points(self) -> list[dict[str, Any]]:
        """Every parameter combination, grid axes in the order given."""
        for name, values in self.grid.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not len(values):
                raise ValueError(f"grid[{name!r}]: expected a non-empty list of values, got {values!r}")
            if name in self.params:
                raise ValueError(f"grid[{name!r}]: also set in params; a parameter is either fixed or swept")
        names = list(self.grid)
        return [{**self.params, **dict(zip(names, combo))}
                for combo in itertools.product(*(self.grid[n] for n in names))]


@dataclass(frozen=True)
class Run:
    """One point of the grid: a model, a task, a method with its parameters, a seed."""

    model: ModelEntry
    task: TaskEntry
    method: str
    params: Mapping[str, Any]
    seed: int

    def describe(self) -> dict[str, Any]:
        """Everything that names the run, JSON-ready (callables by their qualified names)."""
        return {"model": self.model.describe(), "task": self.task.describe(), "method": self.method,
                "params": dict(self.params), "seed": self.seed}

    @property
    def label(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.model.name}/{self.task.name}/{self.method}({params})/seed={self.seed}"


@dataclass(frozen=True)
class Sweep:
    """A grid of runs. `imports` names modules to import before running (in Ray workers too), where
    custom builders, tasks and methods register themselves.

    Example: `Sweep([ModelEntry("attn2l-induction")], [TaskEntry("ind", "induction_task", dict(batch=8,
    half_len=6))], [MethodEntry("acdc", grid={"threshold": [0.01, 0.03]})], seeds=[0, 1]).run("out/sweep")`
    """

    models: Sequence[ModelEntry | str]
    tasks: Sequence[TaskEntry]
    methods: Sequence[MethodEntry]
    seeds: Sequence[int] = (0,)
    imports: Sequence[str] = ()

    def __post_init__(self) -> None:
        models = tuple(ModelEntry(m) if isinstance(m, str) else m for m in self.models)
        object.__setattr__(self, "models", models)
        for what, items, kind in (("models", models, ModelEntry), ("tasks", self.tasks, TaskEntry),
                                  ("methods", self.methods, MethodEntry)):
            if not items:
                raise ValueError(f"{what}: the sweep needs at least one")
            for item in items:
                if not isinstance(item, kind):
                    raise ValueError(f"{what}: expected {kind.__name__} entries, got {type(item).__name__}")
        for what, items in (("models", models), ("tasks", self.tasks)):
            names = [i.name for i in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{what}: names must be distinct, got {names}")
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds: expected a non-empty list of integers, got {list(self.seeds)!r}")

    def runs(self) -> list[Run]:
        """The grid's runs: models, then tasks, then methods and their parameter points, then seeds."""
        return [Run(m, t, method.method, point, seed)
                for m in self.models for t in self.tasks for method in self.methods
                for point in method.points() for seed in self.seeds]

    def run(self, results: str | Path, **options: Any):
        """Run the sweep into the results folder; see `circuits.sweep.run_sweep` for the options."""
        from circuits.sweep.runner import run_sweep

        return run_sweep(self, results, **options)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sweep:
        """A sweep from the dict form of the TOML file (see `load_toml`)."""
        def entries(key: str, make: Callable[[dict], Any]) -> list:
            items = data.get(key)
            if not isinstance(items, list) or not items:
                raise ValueError(f"sweep file: [[{key}]] needs at least one entry")
            return [make(dict(item)) for item in items]

        def model(d: dict) -> ModelEntry:
            _known_keys(d, {"name", "builder", "params"}, "models")
            return ModelEntry(d["name"], d.get("builder"), d.get("params", {}))

        def task(d: dict) -> TaskEntry:
            _known_keys(d, {"name", "generator", "params"}, "tasks")
            return TaskEntry(d["name"], d["generator"], d.get("params", {}))

        def method(d: dict) -> MethodEntry:
            _known_keys(d, {"method", "params", "grid"}, "methods")
            return MethodEntry(d["method"], d.get("params", {}), d.get("grid", {}))

        return cls(entries("models", model), entries("tasks", task), entries("methods", method),
                   seeds=tuple(data.get("seeds", (0,))), imports=tuple(data.get("imports", ())))


def load_toml(path: str | Path) -> tuple[Sweep, dict[str, Any]]:
    """The sweep declared in a TOML file and its `[run]` options (results, backend, address, ...).

    Python 3.11+ reads TOML with the standard library's tomllib; on 3.10 the `tomli` package (in the
    `circuits[sweep]` extra) is used. Example file:

        seeds = [0, 1]
        [run]
        results = "out/sweep"
        [[models]]
        name = "attn2l-induction"
        [[tasks]]
        name = "induction"
        generator = "induction_task"
        params = { batch = 8, half_len = 6 }
        [[methods]]
        method = "acdc"
        grid = { threshold = [0.01, 0.03] }
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ModuleNotFoundError("reading a sweep file on Python 3.10 needs `tomli`: pip install "
                                      "'circuits[sweep]'") from None
    path = Path(path)
    with path.open("rb") as f:
        data = tomllib.load(f)
    _known_keys(data, {"seeds", "imports", "run", "models", "tasks", "methods"}, "the sweep file")
    return Sweep.from_dict(data), dict(data.get("run", {}))


def _callable_name(f: str | Callable[..., Any] | None) -> str | None:
    if f is None or isinstance(f, str):
        return f
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def _known_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(allowed)}")
