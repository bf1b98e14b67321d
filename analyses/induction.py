"""The flagship analysis: one induction circuit seen through three lenses, on 2-layer attention-only models.

    python -m analyses.induction [--model attn2l-induction --model attn2l-pycode] [--device cpu] [--out out/induction]

For each model it names a previous-token head and an induction head three times, independently:
- **weights**: the head pair with the largest K-composition z-score, and `classify_heads`;
- **activations**: the layer-0 and layer-1 heads whose output, patched from the corrupted run into the clean run
  (noising), costs the most of the metric; with denoising, attribution patching and DLA beside it;
- **discovery**: the edge from a layer-0 head into a layer-1 head's k input that ACDC keeps with the largest
  score (EAP and EAP-IG rankings beside it);
then says where the lenses agree. Writes `report.html` and `summary.json` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformer_lens import TransformerBridge

from analyses.common import load_model, pearson, resolve_device
from circuits.activations import activation_patch, attribution_patch, direct_logit_attribution
from circuits.graph import acdc, eap, faithfulness
from circuits.results import head_name
from circuits.tasks import Task, code_induction_task, induction_task
from circuits.weights import classify_heads, composition_scores
from viz import Section, draw_composition, draw_dla, draw_result, report
from viz.circuit import draw_circuit

DEFAULT_MODELS = ("attn2l-induction", "attn2l-pycode")


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
            f"alone, classify_heads calls {lens.evidence['classified']['previous_token'] or 'no head'} previous-token "
            f"and {lens.evidence['classified']['induction'] or 'no head'} induction heads.")
    figures = [draw_composition(comps), draw_result(labels, title="weight signatures per head")]
    return lens, [Section("Weights: composition and head signatures", text, figures)]


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
            f"DLA puts the largest direct effect on {dla.top(1)[0][0]}.")
    figures = [draw_result(noising, title="noising: normalised metric with one head's output corrupted"),
               draw_result(denoising, title="denoising: normalised metric with one head's output restored"),
               draw_result(act_pos, title="activation patching per head and position (denoising)"),
               draw_result(attr_pos, title="attribution patching per head and position (denoising)"),
               draw_dla(dla)]
    return lens, [Section("Activations: patching, attribution and DLA", text, figures)]


def discovery_lens(model: TransformerBridge, task: Task, threshold: float) -> tuple[Lens, list[Section]]:
    """ACDC (KL, resample ablation) and the EAP / EAP-IG rankings, with faithfulness."""
    found = acdc(model, task, threshold=threshold, metric="kl", ablation="resample", progress=False)
    g = found.graph
    k_edges = [(u, v, d["score"]) for u, v, d in g.edges(data=True)
               if d.get("kind") == "residual" and d.get("qkv") == "k"
               and g.nodes[u]["kind"] == "head" and g.nodes[u]["layer"] == 0 and g.nodes[v]["layer"] == 1]
    prev = ind = None
    if k_edges:
        u, v, _ = max(k_edges, key=lambda e: e[2])
        prev, ind = u, v.split(".")[0]
    acdc_faith = faithfulness(model, task, g).normalised
    scores = {"eap": eap(model, task), "eap-ig": eap(model, task, ig_steps=8)}
    curves = {}
    for name, s in scores.items():
        curves[name] = {n: round(float(faithfulness(model, task, s.top_n(n), ablation="resample").normalised), 4)
                        for n in (8, 16, 32)}
    lens = Lens(prev, ind, {
        "acdc_threshold": threshold,
        "acdc_edges": int(found.info["n_edges"]),
        "acdc_forwards": int(found.n_forwards),
        "acdc_faithfulness": round(float(acdc_faith), 4),
        "acdc_k_edges_from_layer0": [[u, v, round(float(s), 5)] for u, v, s in k_edges],
        "top_n_faithfulness": curves,
        "eap_top5": [[list(k), round(v, 5)] for k, v in scores["eap"].top(5)],
        "eap_ig_top5": [[list(k), round(v, 5)] for k, v in scores["eap-ig"].top(5)],
    })
    edge = f"{prev} → {ind}.k" if prev else "no layer-0 head → layer-1 k edge"
    text = (f"ACDC (KL to the clean run, resample ablation, threshold {threshold}) keeps {lens.evidence['acdc_edges']} "
            f"edges in {lens.evidence['acdc_forwards']} evaluated circuits; the circuit alone recovers "
            f"{acdc_faith:.2f} of the normalised metric and contains {edge}. The top 8 / 16 / 32 edges by EAP recover "
            f"{' / '.join(str(v) for v in curves['eap'].values())}, by EAP-IG "
            f"{' / '.join(str(v) for v in curves['eap-ig'].values())}.")
    return lens, [Section("Discovery: ACDC and EAP", text, [draw_circuit(g)])]


def agreement(lenses: dict[str, Lens]) -> dict[str, Any]:
    """Whether every lens names the same previous-token head and the same induction head."""
    out: dict[str, Any] = {}
    for role in ("previous_token_head", "induction_head"):
        named = {name: getattr(lens, role) for name, lens in lenses.items()}
        values = set(named.values())
        out[role] = {"named": named, "agree": len(values) == 1 and None not in values}
    return out


def agreement_text(model_name: str, agree: dict[str, Any]) -> str:
    lines = []
    for role, label in (("previous_token_head", "previous-token head"), ("induction_head", "induction head")):
        named = agree[role]["named"]
        verdict = "all three lenses agree" if agree[role]["agree"] else "the lenses disagree"
        lines.append(f"{label}: " + ", ".join(f"{k} → {v}" for k, v in named.items()) + f" ({verdict}).")
    return f"On {model_name}: " + " ".join(lines)


def analyse(name: str, model: TransformerBridge, *, batch: int, threshold: float, seed: int) -> tuple[dict, list]:
    task = make_task(model, batch=batch, seed=seed)
    timings, lenses, sections = {}, {}, []
    for lens_name, run in (("weights", lambda: weights_lens(model)),
                           ("activations", lambda: activations_lens(model, task)),
                           ("discovery", lambda: discovery_lens(model, task, threshold))):
        start = time.perf_counter()
        lenses[lens_name], secs = run()
        timings[lens_name] = round(time.perf_counter() - start, 2)
        sections += secs
    agree = agreement(lenses)
    sections.insert(0, Section(f"{name}: where the lenses agree", agreement_text(name, agree), []))
    summary = {
        "task": {"name": task.name, "batch": task.batch, "seq_len": task.seq_len, "metric": task.metric.value},
        "lenses": {k: {"previous_token_head": v.previous_token_head, "induction_head": v.induction_head,
                       **v.evidence} for k, v in lenses.items()},
        "agreement": agree,
        "seconds": timings,
    }
    return summary, [Section(f"{name}: {s.title}", s.text, s.figures) if not s.title.startswith(name) else s
                     for s in sections]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="zoo name or saved model folder (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("out/induction"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.02, help="ACDC threshold on the KL increase")
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    path = report(sections, args.out / "report.html", title="One induction circuit, three lenses",
                  subtitle="weights · activations · discovery")
    print(f"wrote {path} and {args.out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
