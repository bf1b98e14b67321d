"""Tasks for tracr-compiled programs (`circuits.models.tracr`): inputs from the program's domain, resample
corruption, and the metrics that fit the program's output.

Clean inputs are full-length inputs of the program's domain (all of them, or `n` drawn without
replacement); each corrupted input is another input of the domain drawn at random (resample corruption,
never the clean row itself). Every row starts with tracr's BOS token in both; the metric reads positions
1..max_seq_len, never BOS (tracr's output there is meaningless). Metrics:

- categorical outputs: "kl" (KL from the clean run, the default) or "logprob" (log-probability of the
  program's output, the clean run's argmax, which equals tracr's decoded output);
- numerical outputs: "l2", minus the mean over rows and positions of the squared distance between the run's
  output and the clean run's (a callable metric, higher meaning more of the behaviour as the metric contract
  requires: 0 on the clean run, negative elsewhere). The named metrics do not fit one
  output value (a KL over one logit is always 0), so pass `program_task(...).metric` to every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.tasks.task import Metric, Task


@dataclass(frozen=True, eq=False)
class ProgramTask:
    """A task on a compiled program and the metrics that fit its output.

    `task` the clean/corrupted tokens and positions; `metric` what to pass as `metric=` to every method (a
    named metric, or the L2 callable for numerical outputs); `metrics` every fitting metric by name;
    `output` "categorical" or "numerical". Example: `acdc(model, pt.task, metric=pt.metric, threshold=1e-4)`
    """

    task: Task
    metric: str | Callable[[Tensor], Tensor]
    metrics: dict[str, str | Callable[[Tensor], Tensor]]
    output: str


def program_task(model: TransformerBridge, *, n: int | None = None, seed: int = 0,
                 metric: str | None = None) -> ProgramTask:
    """A task for a converted tracr model (`from_tracr`): `n` clean inputs from its domain (default: all
    full-length inputs), each with a resampled corrupted input; `metric` one of the names in
    `ProgramTask.metrics` (default "kl" for categorical outputs, "l2" for numerical ones).
    Example: `pt = program_task(from_tracr(compile_program("reverse").assembled), n=32)`"""
    info = getattr(model, "tracr", None)
    if info is None:
        raise ValueError("model: expected a model made by circuits.models.tracr.from_tracr (it has `model.tracr`)")
    domain = info.domain()
    if n is not None and (not isinstance(n, int) or not 2 <= n <= len(domain)):
        raise ValueError(f"n must be an integer in [2, {len(domain)}] (the domain's size), got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(domain), generator=gen)[:n] if n is not None else torch.arange(len(domain))
    clean = info.tokens([domain[int(i)] for i in rows])
    # another input of the domain for each row: shift a random index by 1..len-1 (never the row itself)
    others = (rows + torch.randint(1, len(domain), (len(rows),), generator=gen)) % len(domain)
    corrupted = info.tokens([domain[int(i)] for i in others])
    positions = torch.arange(1, clean.shape[1])
    with torch.no_grad():
        clean_logits = model(clean)[:, positions].detach()
    if info.output == "categorical":
        answers = clean_logits.argmax(-1)
        metrics: dict[str, str | Callable[[Tensor], Tensor]] = {"kl": "kl", "logprob": "logprob"}
        default = "kl"
        task_metric = Metric(metric) if metric in ("kl", "logprob") else Metric.KL
    else:
        answers = torch.zeros(clean.shape[0], len(positions), dtype=torch.long)
        metrics = {"l2": l2_metric(clean_logits)}
        default = "l2"
        task_metric = Metric.KL
    name = default if metric is None else metric
    if name not in metrics:
        raise ValueError(f"metric: expected one of {sorted(metrics)} for a {info.output} output, got {metric!r}")
    task = Task(f"tracr-{info.output}", clean, corrupted, answers, positions, None, task_metric)
    return ProgramTask(task, metrics[name], metrics, info.output)


def l2_metric(clean_at: Float[Tensor, "batch n d_out"]) -> Callable[[Tensor], Tensor]:
    """Minus the L2 loss of a run's outputs at the metric positions against the clean run's: −mean over rows
    and positions of Σ_out (x − clean)², so that higher is better (the metric contract, `circuits.tasks.metrics`).
    Example: `l2_metric(clean_at)(clean_at) == 0`"""
    reference = clean_at.detach()

    def l2(logits_at: Float[Tensor, "batch n d_out"]) -> Tensor:
        return -((logits_at - reference.to(logits_at.device)) ** 2).sum(-1).mean()

    return l2
