"""The flagship analysis: one induction circuit seen through three lenses, on 2-layer attention-only models.

    python -m analyses.induction [--model NAME_OR_FOLDER ...] [--device cpu] [--out out/induction]

The verdicts themselves come from the library (`circuits.verdicts.induction_verdicts`); this module draws them.
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
(`DEFAULT_MODELS`, or `--model` repeated); each is analysed the same way, and with more than one model the
report opens with the models side by side, saying with each lens's numbers where the lenses disagree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformer_lens import TransformerBridge

from analyses.common import load_model, resolve_device, write_outputs
from circuits.models.zoo_recipes import HEAD_THRESHOLD
from circuits.results import LabelledResult
from circuits.tasks import Task
from circuits.verdicts import InductionVerdicts, Verdict, induction_task_for, induction_verdicts
from circuits.verdicts.induction import ACDC_THRESHOLD, KL_THRESHOLD
from viz import Section, draw_composition, draw_dla, draw_result
from viz.circuit import draw_circuit

DEFAULT_MODELS = ("attn2l-induction", "attn2l-pycode-induction")


def weights_section(v: Verdict) -> Section:
    """The weights lens: composition scores (all three kinds) and the weight-signature classification."""
    comps, classified = v.results["composition"], v.evidence["classified"]
    top = v.evidence["top_k_composition_by_zscore"]
    text = (f"K-composition ranks {top[0][0]} → {top[0][1]} first, z = {top[0][2]:.1f} against random matrices of "
            f"the same shapes (baseline {comps['K'].baseline.mean:.3f} ± {comps['K'].baseline.std:.3f}). From "
            f"weights alone, classify_heads calls {', '.join(classified['previous_token']) or 'no head'} "
            f"previous-token and {', '.join(classified['induction']) or 'no head'} induction heads.")
    figures = [draw_composition(comps)] + [signature_figure(v.results["signatures"], sig)
                                          for sig in ("previous_token", "induction")]
    return Section("Weights: composition and head signatures", text, figures)


def signature_figure(labels: LabelledResult, signature: str):
    """One weight signature of `classify_heads` per layer and head, on its own colour scale (the signatures have
    different ranges: one shared scale would hide the attention-sized ones)."""
    i = labels.labels[2].index(signature)
    one = LabelledResult(labels.values[..., i], ("layer", "head"), labels.labels[:2], labels.method, {})
    return draw_result(one, title=f"weight signature per head: {signature}", value_name=signature.replace("_", " "))


def activations_section(v: Verdict) -> Section:
    """The activations lens: per-head patching both ways, patching and attribution per position, DLA."""
    cost, r = v.evidence["noising_cost"], v.evidence["attribution_vs_activation_pearson"]
    text = (f"Noising a head's output (clean run, corrupted activation patched in) costs most at "
            f"{v.previous_token_head} in layer 0 ({cost[v.previous_token_head]:.2f} of the clean–corrupted gap) and "
            f"at {v.induction_head} in layer 1 ({cost[v.induction_head]:.2f}). Attribution patching, per head and "
            f"position, correlates with activation patching at r = {r:.3f}. DLA puts the largest direct effect on "
            f"{''.join(v.evidence['dla_top3'][0][0])}.")
    res = v.results
    figures = [draw_result(res["noising"], title="noising: normalised metric with one head's output corrupted"),
               draw_result(res["denoising"], title="denoising: normalised metric with one head's output restored"),
               draw_result(res["activation_per_position"],
                           title="activation patching per head and position (denoising)"),
               draw_result(res["attribution_per_position"],
                           title="attribution patching per head and position (denoising)"),
               draw_dla(res["dla"])]
    return Section("Activations: patching, attribution and DLA", text, figures)


def discovery_section(v: Verdict, task: Task) -> Section:
    """The discovery lens: ACDC on the task's metric and on KL, and the EAP / EAP-IG faithfulness."""
    e = v.evidence
    curves, k_edges = e["top_n_faithfulness"], e["acdc_k_edges_from_layer0"]
    kl_edges = e["acdc_kl"]["k_edges_from_layer0"]
    edge = f"{k_edges[0][0]} → {k_edges[0][1]}.k" if k_edges else "no layer-0 head → layer-1 k edge"
    kl_edge = f"{kl_edges[0][0]} → {kl_edges[0][1]}.k" if kl_edges else "none"
    text = (f"ACDC on the task's {e['acdc_metric']} (resample ablation, threshold "
            f"{e['acdc_threshold']['fraction_of_gap']:g} of the clean − corrupted gap of "
            f"{e['acdc_threshold']['gap']:.2f}) keeps {e['acdc_edges']} edges after {e['acdc_forwards']} evaluated "
            f"circuits; the circuit alone recovers {e['acdc_faithfulness']:.2f} of the normalised metric, and its "
            f"strongest layer-0 → layer-1 k edge is {edge}. ACDC on KL to the clean run (threshold {KL_THRESHOLD}) "
            f"keeps {e['acdc_kl']['edges']} edges (faithfulness {e['acdc_kl']['faithfulness']:.2f}); its strongest "
            f"such edge is {kl_edge}. The top 8 / 16 / 32 edges by EAP recover "
            f"{' / '.join(str(x) for x in curves['eap'].values())} of the metric, by EAP-IG "
            f"{' / '.join(str(x) for x in curves['eap-ig'].values())}.")
    figure = draw_circuit(v.results["acdc"].graph, title=f"ACDC circuit ({task.metric.value}, {e['acdc_edges']} edges)")
    return Section("Discovery: ACDC and EAP", text, [figure])


def pattern_text(check: Verdict) -> str:
    return (f"Attention patterns on the clean rows, a check outside the three lenses: the layer-0 head attending "
            f"most to the previous token is {check.previous_token_head} (mean attention "
            f"{check.evidence['previous_token_score']:.2f}); the layer-1 head attending most to the token after the "
            f"earlier copy is {check.induction_head} (mean attention {check.evidence['induction_score']:.2f}).")


ROLES = (("previous_token_head", "previous-token head"), ("induction_head", "induction head"))


def summary_table(found: InductionVerdicts) -> list[list[str]]:
    """One row per role: what each lens names, the attention-pattern check, and whether the lenses agree."""
    agree = found.agreement()
    lenses = list(found.verdicts)
    rows = [["", *lenses, "attention patterns (a check)", "the lenses"]]
    for role, label in ROLES:
        named = agree[role]["named"]
        verdict = "✓ agree" if agree[role]["agree"] else "✗ disagree"
        rows.append([label, *(named[k] or "none" for k in lenses), getattr(found.patterns, role), verdict])
    return rows


NUMBER_NAMES = {"weights": "best K-composition z", "activations": "noising cost",
                "discovery": "ACDC k-edge score", "attention patterns": "attention score"}


def contest_text(found: InductionVerdicts) -> str:
    """Where the lenses disagree, plainly: for each contested role, every named head with each lens's number."""
    agree, parts = found.agreement(), []
    for role, label in ROLES:
        if agree[role]["agree"]:
            continue
        named = agree[role]["named"]
        by_head = ", ".join(f"{lens} name {head or 'none'}" for lens, head in named.items())
        numbers = "; ".join(
            f"{head}: " + ", ".join(f"{NUMBER_NAMES[lens]} {value:.3g}" for lens, value in row.items())
            for head, row in found.contest(role).items())
        parts.append(f"The lenses disagree on the {label}: {by_head}. Each lens's number for each named head — "
                     f"{numbers}.")
    parts = parts or ["The three lenses agree on both heads."]
    weak = [f"{label} {getattr(found.patterns, role)} {found.patterns.evidence[role.replace('_head', '_score')]:.3f}"
            for role, label in ROLES if found.patterns.evidence[role.replace("_head", "_score")] <= HEAD_THRESHOLD]
    if weak:
        parts.append(f"The attention-pattern check finds no head above {HEAD_THRESHOLD} (best {', '.join(weak)}): "
                     "by attention alone this model has no such head at the standard offsets, whatever the lenses "
                     "name (its zoo card shows where its heads attend instead).")
    return " ".join(parts)


def disagreement_text(found: InductionVerdicts) -> str:
    """Where the lenses' finer readings part ways: runner-up heads, the KL variant of ACDC, the labelled sets."""
    w, a, d = (found.verdicts[k].evidence for k in ("weights", "activations", "discovery"))
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


def no_behaviour_section(name: str, found: InductionVerdicts) -> Section:
    task, behaviour = found.task, found.behaviour
    text = (f"On {task.name} ({task.batch} rows, metric {task.metric.value}), {name} scores {behaviour.clean:.3f} on "
            f"the clean rows and {behaviour.corrupted:.3f} on the corrupted ones: a clean − corrupted gap of "
            f"{behaviour.gap:+.3f} ± {behaviour.stderr:.3f} (standard error over rows). The model does not show "
            "the induction behaviour, so there is no induction circuit to find: no previous-token or induction "
            "head is named, and the three lenses were not run.")
    return Section(f"{name}: no induction behaviour", text, [])


def analyse(name: str, model: TransformerBridge, *, batch: int, threshold: float, seed: int
            ) -> tuple[InductionVerdicts, list[Section]]:
    """The verdicts of `circuits.verdicts.induction_verdicts` on `model`, and the report's sections for them."""
    found = induction_verdicts(model, induction_task_for(model, batch=batch, seed=seed), threshold=threshold)
    if found.verdicts is None:
        return found, [no_behaviour_section(name, found)]
    b = found.behaviour
    text = (f"The behaviour: {found.task.metric.value} {b.clean:.2f} on clean rows, {b.corrupted:.2f} on "
            f"corrupted ones (gap {b.gap:+.2f} ± {b.stderr:.2f}). The table gives the head each lens names; the "
            "attention-pattern column is a check outside the three lenses.\n\n" + contest_text(found) + "\n\n"
            + pattern_text(found.patterns) + "\n\n" + disagreement_text(found))
    v = found.verdicts
    sections = [Section(f"{name}: what each lens names", text, [], summary_table(found)),
                weights_section(v["weights"]), activations_section(v["activations"]),
                discovery_section(v["discovery"], found.task)]
    return found, [s if s.title.startswith(name) else Section(f"{name}: {s.title}", s.text, s.figures, s.table)
                   for s in sections]


def side_by_side(results: dict[str, InductionVerdicts]) -> Section:
    """The models next to each other: one row per model and role, what each lens names, and whether they agree."""
    rows = [["model", "role", "weights", "activations", "discovery", "attention patterns (a check)", "the lenses"]]
    lines = []
    for name, found in results.items():
        if found.verdicts is None:
            rows.append([name, "(no induction behaviour)", "", "", "", "", ""])
            continue
        agree = found.agreement()
        for role, label in ROLES:
            named = agree[role]["named"]
            rows.append([name, label, *(named[k] or "none" for k in ("weights", "activations", "discovery")),
                         f"{getattr(found.patterns, role)} "
                         f"({found.patterns.evidence[role.replace('_head', '_score')]:.2f})",
                         "✓ agree" if agree[role]["agree"] else "✗ disagree"])
        lines.append(f"{name}: " + contest_text(found))
    text = ("Each model's previous-token head (layer 0) and induction head (layer 1) as each lens names them, with "
            "the attention-pattern check's head and its mean attention beside them.\n\n" + "\n\n".join(lines))
    return Section("The models side by side", text, [], rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="zoo name or saved model folder (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("out/induction"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=ACDC_THRESHOLD,
                        help="ACDC threshold, as a fraction of the task metric's clean − corrupted gap")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    results: dict[str, InductionVerdicts] = {}
    sections: list[Section] = []
    for name in args.model or DEFAULT_MODELS:
        model = load_model(name, device)
        results[name], secs = analyse(name, model, batch=args.batch, threshold=args.threshold, seed=args.seed)
        sections += secs
    if len(results) > 1:
        sections.insert(0, side_by_side(results))
    summary = {"models": {name: found.as_dict() for name, found in results.items()}}
    write_outputs(args.out, summary, sections, title="One induction circuit, three lenses",
                  subtitle="weights · activations · discovery")
    return summary


if __name__ == "__main__":
    main()
