"""Which head is the previous-token head and which the induction head of a 2-layer model, by each lens.

Three independent readings, each naming one layer-0 previous-token head and one layer-1 induction head:
- **weights** (`weights_verdict`): the head pair with the largest K-composition z-score (composition scores
  against random matrices of the same shapes), with `classify_heads`'s labels beside it;
- **activations** (`activations_verdict`): the layer-0 and the layer-1 head whose output, patched from the
  corrupted run into the clean run (noising), costs the most of the task's metric;
- **discovery** (`discovery_verdict`): the strongest edge from a layer-0 head into a layer-1 head's k input that
  ACDC, run on the task's metric with resample ablation, keeps.
Beside them, outside the three, `pattern_verdict` reads attention patterns on the clean rows
(`circuits.models.head_scores`). `induction_verdicts` checks the behaviour first (a model without it gets no
verdict), runs all of them and says whether the lenses agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.activations import activation_patch, attribution_patch, direct_logit_attribution
from circuits.graph import acdc, eap, faithfulness
from circuits.models.head_scores import induction_scores, previous_token_scores
from circuits.results import head_name
from circuits.tasks import Task, code_induction_task, induction_task
from circuits.validate import check_number, check_task
from circuits.weights import classify_heads, composition_scores

LENSES = ("weights", "activations", "discovery")
ROLES = ("previous_token_head", "induction_head")
ACDC_THRESHOLD = 0.01  # a fraction of the task metric's clean − corrupted gap
KL_THRESHOLD = 0.02  # ACDC on KL to the clean run, run beside the task-metric ACDC for comparison


@dataclass(frozen=True, eq=False)
class Verdict:
    """What one lens says: its previous-token head and induction head ("L0H1", or None when it names none),
    `evidence` (the numbers behind the choice, JSON-ready) and `results` (the method results it read, for
    figures; not part of the JSON). Example: `weights_verdict(model).induction_head`"""

    lens: str
    previous_token_head: str | None
    induction_head: str | None
    evidence: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"previous_token_head": self.previous_token_head, "induction_head": self.induction_head,
                **self.evidence}


@dataclass(frozen=True)
class Behaviour:
    """The task metric on the clean and corrupted rows: the gap (clean − corrupted, mean over rows), its
    standard error, and whether the model shows the behaviour (gap > 0 and > 2 standard errors)."""

    clean: float
    corrupted: float
    gap: float
    stderr: float

    @property
    def present(self) -> bool:
        return self.gap > 2 * self.stderr and self.gap > 0

    def as_dict(self) -> dict[str, Any]:
        return {"clean": round(self.clean, 4), "corrupted": round(self.corrupted, 4), "gap": round(self.gap, 4),
                "stderr": round(self.stderr, 4), "present": self.present}


def induction_task_for(model: TransformerBridge, *, batch: int = 16, seed: int = 0) -> Task:
    """Induction on repeated held-out code for a model with a tokenizer (`model.bpe`), on repeated random tokens
    otherwise; |x| = min(24, (n_ctx − 1) // 2). Example: `induction_task_for(load_pretrained("attn2l-induction"))`
    """
    _require_bridge(model)
    half_len = min(24, (model.cfg.n_ctx - 1) // 2)
    if getattr(model, "bpe", None) is not None:
        return code_induction_task(model.bpe, batch, half_len, seed=seed)
    return induction_task(batch, min(half_len, model.cfg.d_vocab - 1), model.cfg.d_vocab, seed=seed)


def check_behaviour(model: TransformerBridge, task: Task) -> Behaviour:
    """The task's metric per row on clean and corrupted input, and the gap between them.

    Example: `check_behaviour(model, task).present`
    """
    with torch.no_grad():
        clean_logits, corrupted_logits = model(task.clean), model(task.corrupted)
    clean, corrupted = (task.position_terms(task.read_logits(x), clean_logits).double().mean(-1)
                        for x in (clean_logits, corrupted_logits))  # [batch] each
    gaps = clean - corrupted
    stderr = float(gaps.std() / len(gaps) ** 0.5) if len(gaps) > 1 else float("inf")
    return Behaviour(float(clean.mean()), float(corrupted.mean()), float(gaps.mean()), stderr)


def _require_bridge(model: object) -> None:
    if not isinstance(model, TransformerBridge):
        raise ValueError(f"model: expected a TransformerBridge, got {type(model).__name__}")


def _require_two_layers(model: TransformerBridge, name: str) -> None:
    _require_bridge(model)
    if model.cfg.n_layers != 2:
        raise ValueError(f"model: {name} names a layer-0 and a layer-1 head; expected 2 layers, got "
                         f"{model.cfg.n_layers}")


def weights_verdict(model: TransformerBridge) -> Verdict:
    """The weights lens: the top K-composition pair by z-score, and `classify_heads`'s labels beside it.

    Example: `weights_verdict(load_pretrained("attn2l-induction")).previous_token_head`
    """
    _require_two_layers(model, "weights_verdict")
    comps = {kind: composition_scores(model, kind) for kind in ("Q", "K", "V")}
    top = comps["K"].top_pairs(5, by="zscore")
    labels = classify_heads(model)
    z = comps["K"].zscores[0, :, 1, :]  # [layer-0 head, layer-1 head]
    return Verdict("weights", top[0][0], top[0][1], {
        "top_k_composition_by_zscore": [list(t) for t in top],
        "k_zscore_best_by_head": {**{head_name(0, h): round(float(z[h].max()), 3) for h in range(z.shape[0])},
                                  **{head_name(1, h): round(float(z[:, h].max()), 3) for h in range(z.shape[1])}},
        "k_baseline": {"mean": comps["K"].baseline.mean, "std": comps["K"].baseline.std},
        "classified": {label: [head_name(*h) for h in labels.heads(label)]
                       for label in ("previous_token", "induction", "copying")},
    }, {"composition": comps, "signatures": labels})


def correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two same-shaped tensors over the entries finite in both.

    Example: `correlation(torch.arange(4.0), 2 * torch.arange(4.0)) == 1.0`
    """
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    keep = a.isfinite() & b.isfinite()
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def activations_verdict(model: TransformerBridge, task: Task) -> Verdict:
    """The activations lens: the layer-0 and layer-1 heads whose noised output costs the most of the normalised
    metric; denoising, per-position activation and attribution patching and DLA are kept beside it.

    Example: `activations_verdict(model, induction_task_for(model)).evidence["noising_cost"]`
    """
    _require_two_layers(model, "activations_verdict")
    noising = activation_patch(model, task, "z", per_position=False, direction="noising", progress=False)
    denoising = activation_patch(model, task, "z", per_position=False, direction="denoising", progress=False)
    act_pos = activation_patch(model, task, "z", per_position=True, direction="denoising", progress=False)
    attr_pos = attribution_patch(model, task, "z", per_position=True, direction="denoising", progress=False)
    dla = direct_logit_attribution(model, task.clean, task.answers, task.wrong_answers, by="head",
                                   positions=task.positions)
    cost = 1 - noising.values  # normalised metric lost when the head is noised
    return Verdict("activations", head_name(0, int(cost[0].argmax())), head_name(1, int(cost[1].argmax())), {
        "noising_cost": {head_name(lay, h): round(float(cost[lay, h]), 4)
                         for lay in range(cost.shape[0]) for h in range(cost.shape[1])},
        "attribution_vs_activation_pearson": round(correlation(act_pos.values, attr_pos.values), 4),
        "activation_top5": [[list(k), round(v, 4)] for k, v in act_pos.top(5)],
        "attribution_top5": [[list(k), round(v, 4)] for k, v in attr_pos.top(5)],
        "dla_top3": [[list(k), round(v, 4)] for k, v in dla.top(3)],
    }, {"noising": noising, "denoising": denoising, "activation_per_position": act_pos,
        "attribution_per_position": attr_pos, "dla": dla})


def k_edges_from_layer0(g) -> list[tuple[str, str, float]]:
    """The edges of circuit graph `g` from a layer-0 head's output into a layer-1 head's k input, strongest
    first, as (source, destination head, score). Example: `k_edges_from_layer0(acdc(...).graph)[0]`"""
    edges = [(u, v.split(".")[0], float(d["score"])) for u, v, d in g.edges(data=True)
             if d.get("kind") == "residual" and d.get("qkv") == "k"
             and g.nodes[u]["kind"] == "head" and g.nodes[u]["layer"] == 0 and g.nodes[v]["layer"] == 1]
    return sorted(edges, key=lambda e: -abs(e[2]))


def metric_gap(model: TransformerBridge, task: Task) -> float:
    """The task metric's clean − corrupted difference: the scale that the ACDC threshold is a fraction of."""
    with torch.no_grad():
        return float(task.score(model(task.clean)) - task.score(model(task.corrupted)))


def discovery_verdict(model: TransformerBridge, task: Task, threshold: float = ACDC_THRESHOLD) -> Verdict:
    """The discovery lens: the strongest layer-0 head → layer-1 k edge that ACDC keeps, run on the task's metric
    (resample ablation, `threshold` a fraction of the clean − corrupted gap). ACDC on KL to the clean run and the
    EAP / EAP-IG rankings' faithfulness (top 8, 16, 32 edges) are kept beside it.

    Example: `discovery_verdict(model, induction_task_for(model)).evidence["acdc_faithfulness"]`
    """
    _require_two_layers(model, "discovery_verdict")
    check_number(threshold, "threshold", positive=True)
    gap = metric_gap(model, task)
    found = acdc(model, task, threshold=threshold * abs(gap), metric=task.metric, ablation="resample",
                 progress=False)
    by_kl = acdc(model, task, threshold=KL_THRESHOLD, metric="kl", ablation="resample", progress=False)
    k_edges, kl_edges = k_edges_from_layer0(found.graph), k_edges_from_layer0(by_kl.graph)
    prev, ind = (k_edges[0][0], k_edges[0][1]) if k_edges else (None, None)
    scores = {"eap": eap(model, task, progress=False), "eap-ig": eap(model, task, ig_steps=8, progress=False)}
    curves = {name: {n: round(float(faithfulness(model, task, s.top_n(n), ablation="resample").normalised), 4)
                     for n in (8, 16, 32)} for name, s in scores.items()}
    return Verdict("discovery", prev, ind, {
        "acdc_metric": task.metric.value,
        "acdc_threshold": {"fraction_of_gap": threshold, "gap": round(gap, 4), "absolute": threshold * abs(gap)},
        "acdc_edges": int(found.info["n_edges"]),
        "acdc_forwards": int(found.n_forwards),
        "acdc_faithfulness": round(float(faithfulness(model, task, found.graph).normalised), 4),
        "acdc_k_edges_from_layer0": [[u, v, round(s, 5)] for u, v, s in k_edges],
        "acdc_kl": {"threshold": KL_THRESHOLD, "edges": int(by_kl.info["n_edges"]),
                    "faithfulness": round(float(faithfulness(model, task, by_kl.graph).normalised), 4),
                    "k_edges_from_layer0": [[u, v, round(s, 5)] for u, v, s in kl_edges]},
        "top_n_faithfulness": curves,
        "eap_top5": [[list(k), round(v, 5)] for k, v in scores["eap"].top(5)],
        "eap_ig_top5": [[list(k), round(v, 5)] for k, v in scores["eap-ig"].top(5)],
    }, {"acdc": found, "acdc_kl": by_kl, **scores})


def pattern_verdict(model: TransformerBridge, task: Task) -> Verdict:
    """Not a lens but a check on them: on the clean rows ([BOS, x, x]), the layer-0 head attending most to the
    previous token and the layer-1 head attending most from T+k to k+1 (`circuits.models.head_scores`), with
    those mean attentions as evidence. Example: `pattern_verdict(model, task).evidence["induction_score"]`"""
    _require_two_layers(model, "pattern_verdict")
    prev = previous_token_scores(model, task.clean).values[0]
    ind = induction_scores(model, task.clean, (task.seq_len - 1) // 2).values[1]
    return Verdict("attention patterns", head_name(0, int(prev.argmax())), head_name(1, int(ind.argmax())), {
        "previous_token_score": round(float(prev.max()), 4), "induction_score": round(float(ind.max()), 4),
        "score_by_head": {**{head_name(0, h): round(float(v), 4) for h, v in enumerate(prev)},
                          **{head_name(1, h): round(float(v), 4) for h, v in enumerate(ind)}}})


@dataclass(frozen=True, eq=False)
class InductionVerdicts:
    """Every lens's verdict on one model and task. `verdicts` and `patterns` are None when the model lacks the
    behaviour (nothing is named then). Example: `induction_verdicts(model).agreement()["induction_head"]["agree"]`
    """

    task: Task
    behaviour: Behaviour
    verdicts: dict[str, Verdict] | None
    patterns: Verdict | None
    seconds: dict[str, float]

    def agreement(self) -> dict[str, Any] | None:
        """Per role: the head each lens names, and whether all name the same one (None names no head)."""
        if self.verdicts is None:
            return None
        out: dict[str, Any] = {}
        for role in ROLES:
            named = {name: getattr(v, role) for name, v in self.verdicts.items()}
            values = set(named.values())
            out[role] = {"named": named, "agree": len(values) == 1 and None not in values}
        return out

    def contest(self, role: str) -> dict[str, dict[str, float]]:
        """For every head some lens names in `role` ("previous_token_head" or "induction_head"), each lens's own
        number for that head: weights, its best K-composition z-score (as the source of a layer-0 → layer-1 pair
        for the previous-token role, as the destination for the induction role); activations, the normalised
        metric lost when it is noised; discovery, the |score| of its strongest ACDC k edge (0 when ACDC keeps none);
        attention patterns, its previous-token or induction attention score. Empty without verdicts.

        Example: `induction_verdicts(model).contest("previous_token_head")["L0H1"]["activations"]`
        """
        if role not in ROLES:
            raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
        if self.verdicts is None:
            return {}
        w, a, d = (self.verdicts[k].evidence for k in LENSES)
        side = 0 if role == "previous_token_head" else 1
        heads = sorted({getattr(v, role) for v in self.verdicts.values()} - {None})
        out = {}
        for head in heads:
            edges = [abs(e[2]) for e in d["acdc_k_edges_from_layer0"] if e[side] == head]
            out[head] = {"weights": w["k_zscore_best_by_head"][head], "activations": a["noising_cost"][head],
                         "discovery": round(max(edges, default=0.0), 5),
                         "attention patterns": self.patterns.evidence["score_by_head"][head]}
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON summary: task, behaviour, each lens's verdict and evidence, agreement, the pattern check."""
        task = {"name": self.task.name, "batch": self.task.batch, "seq_len": self.task.seq_len,
                "metric": self.task.metric.value}
        if self.verdicts is None:
            return {"task": task, "behaviour": self.behaviour.as_dict(), "lenses": None, "agreement": None}
        return {"task": task, "behaviour": self.behaviour.as_dict(),
                "lenses": {name: v.as_dict() for name, v in self.verdicts.items()},
                "agreement": self.agreement(),
                "contest": {role: self.contest(role) for role in ROLES},
                "attention_pattern_check": self.patterns.as_dict(),
                "seconds": self.seconds}


def induction_verdicts(model: TransformerBridge, task: Task | None = None, *,
                       threshold: float = ACDC_THRESHOLD) -> InductionVerdicts:
    """Check the behaviour on `task` (default `induction_task_for(model)`), then run the three lenses and the
    attention-pattern check. A model without the behaviour gets no verdict (`verdicts` is None).

    Example: `induction_verdicts(load_pretrained("attn2l-induction")).agreement()`
    """
    _require_two_layers(model, "induction_verdicts")
    check_number(threshold, "threshold", positive=True)
    task = induction_task_for(model) if task is None else task
    check_task(model, task)
    behaviour = check_behaviour(model, task)
    if not behaviour.present:
        return InductionVerdicts(task, behaviour, None, None, {})
    verdicts, seconds = {}, {}
    for name, run in (("weights", lambda: weights_verdict(model)),
                      ("activations", lambda: activations_verdict(model, task)),
                      ("discovery", lambda: discovery_verdict(model, task, threshold))):
        start = time.perf_counter()
        verdicts[name] = run()
        seconds[name] = round(time.perf_counter() - start, 2)
    return InductionVerdicts(task, behaviour, verdicts, pattern_verdict(model, task), seconds)
