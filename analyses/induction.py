"""The flagship analysis: one induction circuit seen through three lenses, on 2-layer attention-only models.

    python -m analyses.induction [--model NAME_OR_FOLDER ...] [--device cpu] [--out out/induction]

For each model it first checks the behaviour: the task's metric must be higher on the clean (repeated) rows than
on the corrupted ones by more than twice its standard error; a model without the behaviour is reported as such and
no head is named. Otherwise it names a previous-token head and an induction head three times, independently:
- **weights**: the head pair with the largest K-composition z-score, and `classify_heads`;
- **activations**: the layer-0 and layer-1 heads whose output, patched from the corrupted run into the clean run
  (noising), costs the most of the metric; with denoising, attribution patching and DLA beside it;
- **discovery**: the edge from a layer-0 head into a layer-1 head's k input that ACDC, run on the task's metric,
  keeps with the largest score (ACDC on KL, EAP and EAP-IG beside it);
then opens its part of the report with a table of what each lens names, marked agree / disagree, and says where
their finer readings part ways. Writes `report.html` and `summary.json` under `--out`. The models are a list
(`DEFAULT_MODELS`, or `--model` repeated); each is analysed the same way.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformer_lens import TransformerBridge

from analyses.common import load_model, pearson, resolve_device, write_outputs
from circuits.activations import activation_patch, attribution_patch, direct_logit_attribution
from circuits.graph import acdc, eap, faithfulness
from circuits.models.head_scores import induction_scores, previous_token_scores
from circuits.results import LabelledResult, head_name
from circuits.tasks import Task, code_induction_task, induction_task
from circuits.weights import classify_heads, composition_scores
from viz import Section, draw_composition, draw_dla, draw_result
from viz.circuit import draw_circuit

DEFAULT_MODELS = ("attn2l-induction", "attn2l-pycode-induction")
KL_THRESHOLD = 0.02  # ACDC on KL, run beside the task-metric ACDC for comparison


@dataclass
class Lens:
    """What one lens says: its previous-token and induction head, and the numbers behind that."""

    previous_token_head: str | None
    induction_head: str | None
    evidence: dict[str, Any] = field(default_factory=dict)


def make_task(model: TransformerBridge, *, batch: int, seed: int) -> Task:
    """Induction on repeated real code for a model with a tokenizer, on repeated random tokens otherwise."""
    half_len = min(24, (model.cfg.n_ctx - 1) // 2)
    if getattr(model, "bpe", None) is not None:
        return code_induction_task(model.bpe, batch, half_len, seed=seed)
    return induction_task(batch, min(half_len, model.cfg.d_vocab - 1), model.cfg.d_vocab, seed=seed)


def weights_lens(model: TransformerBridge) -> tuple[Lens, list[Section]]:
    """Composition scores (all three kinds) and the weight-signature classification."""
    comps = {kind: composition_scores(model, kind) for kind in ("Q", "K", "V")}
    top = comps["K"].top_pairs(5, by="zscore")
    labels = classify_heads(model)
    prev, ind = top[0][0], top[0][1]
    lens = Lens(prev, ind, {
        "top_k_composition_by_zscore": [list(t) for t in top],
        "k_baseline": {"mean": comps["K"].baseline.mean, "std": comps["K"].baseline.std},
        "classified": {label: [head_name(*h) for h in labels.heads(label)]
                       for label in ("previous_token", "induction", "copying")},
    })
    text = (f"K-composition ranks {prev} → {ind} first, z = {top[0][2]:.1f} against random matrices of the same "
            f"shapes (baseline {comps['K'].baseline.mean:.3f} ± {comps['K'].baseline.std:.3f}). From weights "
            f"alone, classify_heads calls {', '.join(lens.evidence['classified']['previous_token']) or 'no head'} "
            f"previous-token and {', '.join(lens.evidence['classified']['induction']) or 'no head'} induction heads.")
    figures = [draw_composition(comps)] + [signature_figure(labels, sig) for sig in ("previous_token", "induction")]
    return lens, [Section("Weights: composition and head signatures", text, figures)]


def signature_figure(labels: LabelledResult, signature: str):
    """One weight signature of `classify_heads` per layer and head, on its own colour scale (the signatures have
    different ranges: one shared scale would hide the attention-sized ones)."""
    i = labels.labels[2].index(signature)
    one = LabelledResult(labels.values[..., i], ("layer", "head"), labels.labels[:2], labels.method, {})
    return draw_result(one, title=f"weight signature per head: {signature}", value_name=signature.replace("_", " "))


def activations_lens(model: TransformerBridge, task: Task) -> tuple[Lens, list[Section]]:
    """Per-head activation patching both ways, attribution patching per position, and DLA."""
    noising = activation_patch(model, task, "z", per_position=False, direction="noising", progress=False)
    denoising = activation_patch(model, task, "z", per_position=False, direction="denoising", progress=False)
    act_pos = activation_patch(model, task, "z", per_position=True, direction="denoising", progress=False)
    attr_pos = attribution_patch(model, task, "z", per_position=True, direction="denoising")
    dla = direct_logit_attribution(model, task.clean, task.answers, task.wrong_answers, by="head",
                                   positions=task.positions)
    cost = 1 - noising.values  # normalised metric lost when the head is noised
    prev = head_name(0, int(cost[0].argmax()))
    ind = head_name(1, int(cost[1].argmax()))
    r = pearson(act_pos.values, attr_pos.values)
    lens = Lens(prev, ind, {
        "noising_cost": {head_name(lay, h): round(float(cost[lay, h]), 4)
                         for lay in range(cost.shape[0]) for h in range(cost.shape[1])},
        "attribution_vs_activation_pearson": round(r, 4),
        "activation_top5": [[list(k), round(v, 4)] for k, v in act_pos.top(5)],
        "attribution_top5": [[list(k), round(v, 4)] for k, v in attr_pos.top(5)],
        "dla_top3": [[list(k), round(v, 4)] for k, v in dla.top(3)],
    })
    text = (f"Noising a head's output (clean run, corrupted activation patched in) costs most at {prev} in layer 0 "
            f"({cost[0].max():.2f} of the clean–corrupted gap) and at {ind} in layer 1 ({cost[1].max():.2f}). "
            f"Attribution patching, per head and position, correlates with activation patching at r = {r:.3f}. "
            f"DLA puts the largest direct effect on {''.join(dla.top(1)[0][0])}.")
    figures = [draw_result(noising, title="noising: normalised metric with one head's output corrupted"),
               draw_result(denoising, title="denoising: normalised metric with one head's output restored"),
               draw_result(act_pos, title="activation patching per head and position (denoising)"),
               draw_result(attr_pos, title="attribution patching per head and position (denoising)"),
               draw_dla(dla)]
    return lens, [Section("Activations: patching, attribution and DLA", text, figures)]


@dataclass(frozen=True)
class Behaviour:
    """The task metric on the clean and corrupted rows: the gap (clean − corrupted, mean over rows), its
    standard error, and whether the model shows the behaviour (gap > 2 standard errors)."""

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


def check_behaviour(model: TransformerBridge, task: Task) -> Behaviour:
    """The task's metric per row on clean and corrupted input, and the gap between them."""
    with torch.no_grad():
        clean_logits, corrupted_logits = model(task.clean), model(task.corrupted)
    clean, corrupted = (task.position_terms(task.read_logits(x), clean_logits).double().mean(-1)
                        for x in (clean_logits, corrupted_logits))  # [batch] each
    gaps = clean - corrupted
    stderr = float(gaps.std() / len(gaps) ** 0.5) if len(gaps) > 1 else float("inf")
    return Behaviour(float(clean.mean()), float(corrupted.mean()), float(gaps.mean()), stderr)


def metric_gap(model: TransformerBridge, task: Task) -> float:
    """The task metric's clean − corrupted difference: the scale that the ACDC threshold is a fraction of."""
    with torch.no_grad():
        return float(task.score(model(task.clean)) - task.score(model(task.corrupted)))


def k_edges_from_layer0(g) -> list[tuple[str, str, float]]:
    """The kept edges from a layer-0 head's output into a layer-1 head's k input, strongest first."""
    edges = [(u, v.split(".")[0], float(d["score"])) for u, v, d in g.edges(data=True)
             if d.get("kind") == "residual" and d.get("qkv") == "k"
             and g.nodes[u]["kind"] == "head" and g.nodes[u]["layer"] == 0 and g.nodes[v]["layer"] == 1]
    return sorted(edges, key=lambda e: -abs(e[2]))


def discovery_lens(model: TransformerBridge, task: Task, threshold: float) -> tuple[Lens, list[Section]]:
    """ACDC on the task's metric (resample ablation) and the EAP / EAP-IG rankings, with faithfulness.

    The lens names the strongest kept edge from a layer-0 head into a layer-1 head's k input (the composition
    an induction circuit needs). ACDC judges edges by the task's own metric, as the activations lens does, with
    `threshold` a fraction of the clean − corrupted gap; ACDC on KL to the clean run is run beside it.
    """
    gap = metric_gap(model, task)
    found = acdc(model, task, threshold=threshold * abs(gap), metric=task.metric, ablation="resample",
                 progress=False)
    by_kl = acdc(model, task, threshold=KL_THRESHOLD, metric="kl", ablation="resample", progress=False)
    g = found.graph
    k_edges, kl_edges = k_edges_from_layer0(g), k_edges_from_layer0(by_kl.graph)
    prev, ind = (k_edges[0][0], k_edges[0][1]) if k_edges else (None, None)
    acdc_faith = faithfulness(model, task, g).normalised
    kl_faith = faithfulness(model, task, by_kl.graph).normalised
    scores = {"eap": eap(model, task), "eap-ig": eap(model, task, ig_steps=8)}
    curves = {}
    for name, s in scores.items():
        curves[name] = {n: round(float(faithfulness(model, task, s.top_n(n), ablation="resample").normalised), 4)
                        for n in (8, 16, 32)}
    lens = Lens(prev, ind, {
        "acdc_metric": task.metric.value,
        "acdc_threshold": {"fraction_of_gap": threshold, "gap": round(gap, 4), "absolute": threshold * abs(gap)},
        "acdc_edges": int(found.info["n_edges"]),
        "acdc_forwards": int(found.n_forwards),
        "acdc_faithfulness": round(float(acdc_faith), 4),
        "acdc_k_edges_from_layer0": [[u, v, round(s, 5)] for u, v, s in k_edges],
        "acdc_kl": {"threshold": KL_THRESHOLD, "edges": int(by_kl.info["n_edges"]),
                    "faithfulness": round(float(kl_faith), 4),
                    "k_edges_from_layer0": [[u, v, round(s, 5)] for u, v, s in kl_edges]},
        "top_n_faithfulness": curves,
        "eap_top5": [[list(k), round(v, 5)] for k, v in scores["eap"].top(5)],
        "eap_ig_top5": [[list(k), round(v, 5)] for k, v in scores["eap-ig"].top(5)],
    })
    edge = f"{prev} → {ind}.k" if prev else "no layer-0 head → layer-1 k edge"
    kl_edge = f"{kl_edges[0][0]} → {kl_edges[0][1]}.k" if kl_edges else "none"
    text = (f"ACDC on the task's {task.metric.value} (resample ablation, threshold {threshold:g} of the clean − "
            f"corrupted gap of {gap:.2f}) keeps {lens.evidence['acdc_edges']} edges after "
            f"{lens.evidence['acdc_forwards']} evaluated circuits; the circuit alone recovers {acdc_faith:.2f} of the "
            f"normalised metric, and its strongest layer-0 → layer-1 k edge is {edge}. ACDC on KL to the clean run "
            f"(threshold {KL_THRESHOLD}) keeps {lens.evidence['acdc_kl']['edges']} edges (faithfulness "
            f"{kl_faith:.2f}); its strongest such edge is {kl_edge}. The top 8 / 16 / 32 edges by EAP recover "
            f"{' / '.join(str(v) for v in curves['eap'].values())} of the metric, by EAP-IG "
            f"{' / '.join(str(v) for v in curves['eap-ig'].values())}.")
    figures = [draw_circuit(g, title=f"ACDC circuit ({task.metric.value}, {lens.evidence['acdc_edges']} edges)")]
    return lens, [Section("Discovery: ACDC and EAP", text, figures)]


def agreement(lenses: dict[str, Lens]) -> dict[str, Any]:
    """Whether every lens names the same previous-token head and the same induction head."""
    out: dict[str, Any] = {}
    for role in ("previous_token_head", "induction_head"):
        named = {name: getattr(lens, role) for name, lens in lenses.items()}
        values = set(named.values())
        out[role] = {"named": named, "agree": len(values) == 1 and None not in values}
    return out


def pattern_check(model: TransformerBridge, task: Task) -> dict[str, Any]:
    """Not a lens but a check on them: the heads whose attention patterns on the clean rows ([BOS, x, x]) look
    most like a previous-token head in layer 0 and an induction head in layer 1 (`circuits.models.head_scores`)."""
    half_len = (task.seq_len - 1) // 2
    prev = previous_token_scores(model, task.clean).values[0]
    ind = induction_scores(model, task.clean, half_len).values[1]
    return {"previous_token_head": head_name(0, int(prev.argmax())),
            "previous_token_score": round(float(prev.max()), 4),
            "induction_head": head_name(1, int(ind.argmax())), "induction_score": round(float(ind.max()), 4)}


def pattern_text(check: dict[str, Any]) -> str:
    return (f"Attention patterns on the clean rows, a check outside the three lenses: the layer-0 head attending "
            f"most to the previous token is {check['previous_token_head']} (mean attention "
            f"{check['previous_token_score']:.2f}); the layer-1 head attending most to the token after the earlier "
            f"copy is {check['induction_head']} (mean attention {check['induction_score']:.2f}).")


ROLES = (("previous_token_head", "previous-token head"), ("induction_head", "induction head"))


def summary_table(agree: dict[str, Any], check: dict[str, Any]) -> list[list[str]]:
    """One row per role: what each lens names, the attention-pattern check, and whether the lenses agree."""
    lenses = list(agree[ROLES[0][0]]["named"])
    rows = [["", *lenses, "attention patterns (a check)", "the lenses"]]
    for role, label in ROLES:
        named = agree[role]["named"]
        verdict = "✓ agree" if agree[role]["agree"] else "✗ disagree"
        rows.append([label, *(named[k] or "none" for k in lenses), check[role], verdict])
    return rows


def disagreement_text(lenses: dict[str, Lens]) -> str:
    """Where the lenses' finer readings part ways: runner-up heads, the KL variant of ACDC, the labelled sets."""
    w, a, d = (lenses[k].evidence for k in ("weights", "activations", "discovery"))
    top = w["top_k_composition_by_zscore"]
    parts = [f"Margins: the top K-composition pair {top[0][0]} → {top[0][1]} has z = {top[0][2]:.1f}, the next "
             f"{top[1][0]} → {top[1][1]} z = {top[1][2]:.1f}."]
    if top[0][2] - top[1][2] < 1.0:
        parts.append("K-composition does not single out one pair here: the top two z-scores are within 1 of "
                     "each other, so the weights lens's pick is a near tie.")
    cost = sorted(((v, k) for k, v in a["noising_cost"].items() if k.startswith("L1")), reverse=True)
    if len(cost) > 1:
        parts.append(f"Noising costs {cost[0][1]} {cost[0][0]:.2f} of the metric and {cost[1][1]} {cost[1][0]:.2f}.")
    k_edges, kl_edges = d["acdc_k_edges_from_layer0"], d["acdc_kl"]["k_edges_from_layer0"]
    if len(k_edges) > 1:
        parts.append(f"ACDC's strongest k edges: {k_edges[0][0]} → {k_edges[0][1]} {k_edges[0][2]:.3f}, "
                     f"{k_edges[1][0]} → {k_edges[1][1]} {k_edges[1][2]:.3f}.")
    if kl_edges and k_edges and kl_edges[0][:2] != k_edges[0][:2]:
        parts.append(f"Judged by KL to the clean run instead of the task metric, ACDC ranks {kl_edges[0][0]} → "
                     f"{kl_edges[0][1]} first ({kl_edges[0][2]:.3f}): KL weighs the whole next-token distribution, "
                     "where heads that are interchangeable for the answer's logit difference differ.")
    classified = w["classified"]
    parts.append(f"From weights alone, classify_heads labels {', '.join(classified['previous_token']) or 'no head'} "
                 f"previous-token and {', '.join(classified['induction']) or 'no head'} induction heads.")
    eap8, ig16 = d["top_n_faithfulness"]["eap"][8], d["top_n_faithfulness"]["eap-ig"][16]
    parts.append(f"The attribution rankings are less faithful than ACDC's circuit ({d['acdc_faithfulness']:.2f} "
                 f"with {d['acdc_edges']} edges): EAP's top 8 edges recover {eap8:.2f}, EAP-IG's top 16 {ig16:.2f}.")
    return " ".join(parts)


def no_behaviour_section(name: str, task: Task, behaviour: Behaviour) -> Section:
    text = (f"On {task.name} ({task.batch} rows, metric {task.metric.value}), {name} scores {behaviour.clean:.3f} on "
            f"the clean rows and {behaviour.corrupted:.3f} on the corrupted ones: a clean − corrupted gap of "
            f"{behaviour.gap:+.3f} ± {behaviour.stderr:.3f} (standard error over rows). The model does not show "
            "the induction behaviour, so there is no induction circuit to find: no previous-token or induction "
            "head is named, and the three lenses were not run.")
    return Section(f"{name}: no induction behaviour", text, [])


def analyse(name: str, model: TransformerBridge, *, batch: int, threshold: float, seed: int) -> tuple[dict, list]:
    task = make_task(model, batch=batch, seed=seed)
    task_info = {"name": task.name, "batch": task.batch, "seq_len": task.seq_len, "metric": task.metric.value}
    behaviour = check_behaviour(model, task)
    if not behaviour.present:
        return {"task": task_info, "behaviour": behaviour.as_dict(), "lenses": None, "agreement": None}, [
            no_behaviour_section(name, task, behaviour)]
    timings, lenses, sections = {}, {}, []
    for lens_name, run in (("weights", lambda: weights_lens(model)),
                           ("activations", lambda: activations_lens(model, task)),
                           ("discovery", lambda: discovery_lens(model, task, threshold))):
        start = time.perf_counter()
        lenses[lens_name], secs = run()
        timings[lens_name] = round(time.perf_counter() - start, 2)
        sections += secs
    agree = agreement(lenses)
    check = pattern_check(model, task)
    text = (f"The behaviour: {task.metric.value} {behaviour.clean:.2f} on clean rows, {behaviour.corrupted:.2f} on "
            f"corrupted ones (gap {behaviour.gap:+.2f} ± {behaviour.stderr:.2f}). The table gives the head each "
            "lens names; the attention-pattern column is a check outside the three lenses.\n\n"
            + pattern_text(check) + "\n\n" + disagreement_text(lenses))
    sections.insert(0, Section(f"{name}: what each lens names", text, [], summary_table(agree, check)))
    summary = {
        "task": task_info,
        "behaviour": behaviour.as_dict(),
        "lenses": {k: {"previous_token_head": v.previous_token_head, "induction_head": v.induction_head,
                       **v.evidence} for k, v in lenses.items()},
        "agreement": agree,
        "attention_pattern_check": check,
        "seconds": timings,
    }
    return summary, [Section(f"{name}: {s.title}", s.text, s.figures, s.table) if not s.title.startswith(name)
                     else s for s in sections]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="zoo name or saved model folder (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("out/induction"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.01,
                        help="ACDC threshold, as a fraction of the task metric's clean − corrupted gap")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    summary: dict[str, Any] = {"models": {}}
    sections: list[Section] = []
    for name in args.model or DEFAULT_MODELS:
        model = load_model(name, device)
        result, secs = analyse(name, model, batch=args.batch, threshold=args.threshold, seed=args.seed)
        summary["models"][name] = result
        sections += secs
    write_outputs(args.out, summary, sections, title="One induction circuit, three lenses",
                  subtitle="weights · activations · discovery")
    return summary


if __name__ == "__main__":
    main()
