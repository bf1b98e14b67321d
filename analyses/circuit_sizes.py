"""How many edges a faithful circuit needs: the rankings of EAP, EAP-IG and ACDC against a direct search.

    python -m analyses.circuit_sizes [--model attn2l-induction] [--batch 32] [--half 20] [--out out/circuit_sizes]

For each ranking of the edges (EAP, EAP-IG with 8 steps, ACDC's loss increases on KL at threshold 0.01), the
normalised logit difference of the circuit made of its top-n edges (resample ablation). Beside them, a
backward elimination that optimises that metric itself: from the full graph, repeatedly remove the edge whose
removal keeps the metric highest (one batched forward per step over every remaining edge). It is a search,
not a bound, but a ranking that scores below it at some size leaves faithfulness on the table there, and a
size where it stays low is one where no ranking does much better. Writes `report.html` and `summary.json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from analyses.common import load_model, write_outputs
from circuits.graph import acdc, eap, faithfulness_curve
from circuits.graph.metric import resolve_metric
from circuits.graph.patching import EdgePatcher
from circuits.tasks import Task, induction_task
from circuits.tasks.task import normalise
from viz import Section, draw_faithfulness

SIZES = (4, 8, 12, 16, 20, 24, 32, 48)


def backward_elimination(model: TransformerBridge, task: Task, *, smallest: int = 4, progress: bool = True
                         ) -> dict[int, float]:
    """{n: normalised metric} of the circuits left as edges are removed one at a time, each step removing the
    edge whose removal keeps the task's normalised metric highest (resample ablation).
    Example: `backward_elimination(model, induction_task(8, 10, 64), smallest=8)[16]`"""
    p = EdgePatcher(model, task, "resample")
    gm = resolve_metric(task, task.metric, p.clean_logits_full)
    mask = p.graph.valid.clone().to(p.device)
    with torch.no_grad():
        clean, corrupted = gm.fn(p.run(torch.stack([mask, torch.zeros_like(mask)]))).tolist()
    found = {int(mask.sum()): 1.0}
    steps = int(mask.sum()) - smallest
    for _ in tqdm(range(steps), desc="backward elimination", disable=not progress):
        edges = mask.nonzero()
        candidates = mask[None].repeat(len(edges), 1, 1)
        candidates[torch.arange(len(edges)), edges[:, 0], edges[:, 1]] = False
        with torch.no_grad():
            values = torch.cat([gm.fn(p.run(chunk)) for chunk in candidates.split(p.chunk_size())])
        values = normalise(values, corrupted, clean)
        best = int(values.argmax())
        mask = candidates[best]
        found[int(mask.sum())] = float(values[best])
    return found


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="attn2l-induction")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--half", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("out/circuit_sizes"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    task = induction_task(args.batch, args.half, model.cfg.d_vocab, seed=0)
    rankings = {"EAP": eap(model, task), "EAP-IG (8 steps)": eap(model, task, ig_steps=8),
                "ACDC (KL, threshold 0.01)": acdc(model, task, threshold=0.01, metric="kl", progress=not args.quiet)}
    n_total = int(rankings["EAP"].circuit.graph.valid.sum())
    sizes = [n for n in SIZES if n <= n_total]
    curves = {name: faithfulness_curve(model, task, r, sizes) for name, r in rankings.items()}
    search = backward_elimination(model, task, progress=not args.quiet)
    table = {name: {n: round(float(v), 4) for n, v in zip(c.n_edges, c.faithfulness)} for name, c in curves.items()}
    table["backward elimination"] = {n: round(search[n], 4) for n in sizes if n in search}
    summary = {"model": args.model, "task": {"batch": args.batch, "tokens": task.seq_len, "metric": task.metric.value},
               "edges": n_total, "normalised_metric_by_size": table}
    ordered = sorted(search.items())
    figure = draw_faithfulness({**curves, "backward elimination": ([n for n, _ in ordered], [v for _, v in ordered])},
                               title=f"{args.model}: normalised logit difference of the top-n edges")
    text = "\n\n".join(f"{name}: " + ", ".join(f"{n} edges {v:.3f}" for n, v in row.items())
                       for name, row in table.items())
    return write_outputs(args.out, summary, [Section("Faithfulness by circuit size", text, [figure])],
                         title="How many edges a faithful circuit needs", subtitle=args.model)


if __name__ == "__main__":
    main()
