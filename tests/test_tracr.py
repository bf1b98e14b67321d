"""tracr programs as models with known circuits: conversion against tracr itself, the known circuit against
edge patching, ACDC against the known circuit, the tasks, node patching against hooks, and ROC by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_graph_patching import hooked_edge_patch
from transformer_lens import TransformerBridge, TransformerBridgeConfig

from circuits.graph import Circuit, ComputeGraph, acdc, eap, roc
from circuits.graph.faithfulness import step_auc
from circuits.graph.known import circuit_nodes, inert_edges, residual_circuit
from circuits.graph.node_patching import node_patching
from circuits.graph.patching import EdgePatcher
from circuits.tasks import induction_task

pytest.importorskip("tracr", reason="the tracr extra: pip install 'circuits[tracr]'")

from circuits.models.tracr import compile_program, from_tracr, tracr_forward  # noqa: E402
from circuits.tasks.tracr import program_task  # noqa: E402

PROGRAMS = ("reverse", "frac_prevs", "hist")


@pytest.fixture(scope="session")
def compiled():
    """name -> (tracr's compiled program, our bridge)."""
    out = {}
    for name in PROGRAMS:
        program = compile_program(name)
        out[name] = (program, from_tracr(program.assembled))
    return out


@pytest.fixture(scope="session")
def padded():
    """A program whose layers have different numbers of heads (0 and 2): tracr pads the first with zero heads."""
    program = compile_program("same_neighbours")
    return program, from_tracr(program.assembled)


def test_padded_heads_convert_and_have_no_edges(padded):
    program, model = padded
    assert model.cfg.n_heads == 2 and (model.W_Q[0] == 0).all() and (model.W_Q[1] != 0).any(-1).any(-1).all()
    check_whole_domain(program, model)
    known = residual_circuit(model)
    assert not any(name.startswith("L0H") or "->L0H" in name for name in known.edge_names())
    task = program_task(model).task
    p = EdgePatcher(model, task, "zero")
    outside = p.graph.valid[None] & ~known.members[None]
    assert (p.run(p.graph.valid[None] & ~outside)[0] - p.clean_logits).abs().max() <= 1e-6


@pytest.mark.parametrize("name", PROGRAMS)
def test_logits_equal_tracr_on_the_whole_domain(compiled, name):
    check_whole_domain(*compiled[name])


def check_whole_domain(program, model):
    """Our logits equal tracr's (1e-5) on every input of every length; where tracr's largest logit is unique
    (by more than 1e-4) our argmax is tracr's output."""
    info = model.tracr
    assert model.cfg.attention_dir == "bidirectional"
    n, n_unique, n_positions = 0, 0, 0
    for length in range(1, info.max_seq_len + 1):
        inputs = info.domain(length)
        with torch.no_grad():
            ours = model(info.tokens(inputs)).double().numpy()
        ref, out = tracr_forward(program.assembled, inputs)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < 1e-5
        if info.output == "categorical":  # tracr's own output is the argmax (BOS's position is meaningless)
            top2 = np.sort(ref[:, 1:], -1)[..., -2:]
            unique = top2[..., 1] - top2[..., 0] > 1e-4
            assert (ours[:, 1:].argmax(-1) == out[:, 1:])[unique].all()
            n_unique += int(unique.sum())
        else:
            assert np.abs(ours[..., 0] - out).max() < 1e-5
        n += len(inputs)
        n_positions += len(inputs) * length
    # the argmax check is not vacuous (same_neighbours: 40 of 98 positions have a unique top logit, the
    # others have no neighbour on one side; the other programs all of them)
    assert info.output == "numerical" or n_unique >= 0.4 * n_positions
    assert n == sum(len(info.vocab) ** k for k in range(1, info.max_seq_len + 1))


def test_decoded_outputs_are_the_programs(compiled):
    """The bridge's argmax decodes to what the RASP program computes (reverse reverses, hist counts)."""
    _, model = compiled["reverse"]
    with torch.no_grad():
        logits = model(model.tracr.tokens([(1, 2, 3, 3)]))
    assert [model.tracr.output_values[i] for i in logits[0, 1:].argmax(-1)] == [3, 3, 2, 1]
    _, hist = compiled["hist"]
    with torch.no_grad():
        logits = hist(hist.tracr.tokens([("a", "b", "a", "c")]))
    assert [hist.tracr.output_values[i] for i in logits[0, 1:].argmax(-1)] == [2, 1, 2, 1]


def relu_mlp_model(attention_dir: str):
    """A random 2-layer model with ReLU MLPs, LayerNorm and non-trivial biases (b_O included)."""
    cfg = TransformerBridgeConfig(n_layers=2, d_model=32, n_ctx=20, d_head=8, n_heads=4, d_vocab=24, d_mlp=48,
                                  act_fn="relu", attention_dir=attention_dir, normalization_type="LN")
    torch.manual_seed(4)
    model = TransformerBridge.boot_native(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "bias" in pname or "ln" in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("attention_dir", ["bidirectional", "causal"])
@pytest.mark.parametrize("source,destination", [("L0H1", "L1H2.k"), ("tok_embed", "L0H0.v"), ("MLP0", "L1H3.q"),
                                                ("L1H0", "logits"), ("L0H2", "MLP1")])
def test_edge_patching_of_relu_mlp_models_equals_hooks(attention_dir, source, destination):
    model = relu_mlp_model(attention_dir)
    task = induction_task(6, 8, 24, seed=2)
    with torch.no_grad():  # bidirectional: the first position's logits depend on the last token
        changed = task.clean.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 24
        reads_ahead = (model(changed)[:, 0] - model(task.clean)[:, 0]).abs().max() > 1e-3
        assert reads_ahead == (attention_dir == "bidirectional")
    p = EdgePatcher(model, task, "resample")
    with torch.no_grad():
        assert (p.run(p.graph.valid[None])[0] - model(task.clean)[:, task.positions]).abs().max() < 1e-5
    e = p.graph.edge(source, destination)
    mask = p.graph.valid.clone()
    mask[e.src, e.dst] = False
    oracle = hooked_edge_patch(model, task, source, destination)
    assert (oracle - p.clean_logits).abs().max() > 1e-3
    assert (p.run(mask[None])[0] - oracle).abs().max() < 1e-5


@pytest.mark.parametrize("name", PROGRAMS)
def test_full_circuit_is_the_tracr_model(compiled, name):
    _, model = compiled[name]
    task = program_task(model).task
    p = EdgePatcher(model, task, "zero")
    with torch.no_grad():
        ref = model(task.clean)[:, task.positions]
    assert (p.run(p.graph.valid[None])[0] - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", PROGRAMS)
def test_edges_outside_the_known_circuit_carry_nothing(compiled, name):
    """Zero ablation of any edge outside the known circuit (one at a time, and all of them at once) changes
    no logit beyond float rounding; the known circuit alone reproduces the model."""
    _, model = compiled[name]
    known = residual_circuit(model)
    task = program_task(model).task
    p = EdgePatcher(model, task, "zero")
    outside = (p.graph.valid & ~known.members).nonzero().tolist()
    assert outside and known.n_edges > 0
    masks = p.graph.valid[None].repeat(len(outside) + 1, 1, 1)
    for i, (s, d) in enumerate(outside):
        masks[i, s, d] = False
    masks[-1] = known.members
    change = (p.run(masks) - p.clean_logits).abs().amax()
    assert change <= 1e-6
    # and the known circuit is not everything that matters by accident: removing all of it changes the output
    none = (p.run(torch.zeros_like(known.members)[None])[0] - p.clean_logits).abs().amax()
    assert none > 0.1


# measured: tracr's BOS default-attention terms ('one' in the query, tokens:BOS in the key) change nothing
# where a selector always matches a key, and reverse's length head (an always-true selector) computes the
# same length from a zeroed query; on full-length inputs its output to MLP0 changes nothing either
INERT_ON_DOMAIN = {
    "reverse": {"tok_embed->L0H0.q", "tok_embed->L0H0.k", "tok_embed->L0H0.v", "L0H0->MLP0",
                "tok_embed->L3H0.q", "tok_embed->L3H0.k"},
    "frac_prevs": {"tok_embed->L1H0.q", "tok_embed->L1H0.k"},
    "hist": set(),
}


@pytest.mark.parametrize("name", PROGRAMS)
def test_acdc_with_zero_ablation_recovers_the_known_circuit(compiled, name):
    """At a small threshold ACDC (zero ablation) keeps exactly the known circuit less the known edges that
    change nothing on the domain (none for hist), and nothing outside it; its sweep's AUC follows."""
    _, model = compiled[name]
    pt = program_task(model)
    known = residual_circuit(model)
    inert_mask = inert_edges(model, pt.task, known, "zero")
    inert = {e.name for e in known.graph.edges() if inert_mask[e.src, e.dst]}
    assert inert == INERT_ON_DOMAIN[name]
    found = acdc(model, pt.task, threshold=1e-6, metric=pt.metric, ablation="zero", progress=False)
    assert set(found.circuit.edge_names()) == set(known.edge_names()) - inert
    if not inert:
        assert torch.equal(found.circuit.members, known.members)
        assert roc([found], known).auc == 1.0


def test_acdc_recovers_the_planted_circuit():
    from circuits.models import planted_induction

    model = planted_induction()
    known = residual_circuit(model, heads=[model.planted.previous_token, model.planted.induction])
    assert set(known.edge_names()) == {"pos_embed->L0H2.q", "pos_embed->L0H2.k", "tok_embed->L0H2.v",
                                       "tok_embed->L1H1.q", "L0H2->L1H1.k", "tok_embed->L1H1.v", "L1H1->logits"}
    task = induction_task(8, 6, model.cfg.d_vocab, seed=0)
    found = acdc(model, task, threshold=1e-2, ablation="zero", progress=False)
    assert torch.equal(found.circuit.members, known.members)


def test_program_task(compiled):
    program, model = compiled["reverse"]
    pt = program_task(model, n=20, seed=3)
    t = pt.task
    bos = model.tracr.bos
    assert (t.clean[:, 0] == bos).all() and (t.corrupted[:, 0] == bos).all()
    assert (t.clean[:, 1:] != bos).all() and (t.corrupted[:, 1:] != bos).all()
    assert t.positions.tolist() == [1, 2, 3, 4]
    assert ((t.clean != t.corrupted).any(1)).all()  # a resampled input is another input
    assert len({tuple(r) for r in t.clean.tolist()}) == 20  # drawn without replacement
    decoded = [program.assembled.apply(["BOS", *[model.tracr.vocab[i - min(model.tracr.token_ids[v]
                                                                     for v in model.tracr.vocab)]
                                                  for i in row[1:]]]).decoded[1:] for row in t.clean.tolist()[:3]]
    assert [[model.tracr.output_values[i] for i in row] for row in t.answers[:3].tolist()] == decoded
    assert pt.metric == "kl" and set(pt.metrics) == {"kl", "logprob"}
    with pytest.raises(ValueError, match="metric"):
        program_task(model, metric="l2")
    with pytest.raises(ValueError, match="n must be"):
        program_task(model, n=10**6)


def test_numerical_task_metric_is_minus_l2(compiled):
    _, model = compiled["frac_prevs"]
    pt = program_task(model, n=16)
    assert pt.output == "numerical" and set(pt.metrics) == {"l2"}
    with torch.no_grad():
        clean = model(pt.task.clean)[:, pt.task.positions]
        corrupted = model(pt.task.corrupted)[:, pt.task.positions]
    assert float(pt.metric(clean)) == 0.0
    assert math.isclose(float(pt.metric(corrupted)), -float(((corrupted - clean) ** 2).sum(-1).mean()), rel_tol=1e-6)


@pytest.mark.parametrize("ablation", ["zero", "resample"])
def test_node_patching_equals_hooked_head_ablation(planted, ablation):
    """Ablating every outgoing edge of a head = replacing its hook_z output in the bridge (its z @ W_O term)."""
    task = induction_task(6, 5, planted.cfg.d_vocab, seed=1)
    result = node_patching(planted, task, ablation=ablation, metric="logprob")
    with torch.no_grad():
        _, corrupted = planted.run_with_cache(task.corrupted)
        clean = task.with_metric("logprob").score(planted(task.clean))
        for layer, head in [(0, 2), (1, 1), (1, 0)]:
            def hook(z, hook, layer=layer, head=head):
                z = z.clone()
                z[:, :, head] = 0 if ablation == "zero" else corrupted[f"blocks.{layer}.attn.hook_z"][:, :, head]
                return z
            logits = planted.run_with_hooks(task.clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])
            expected = clean - task.with_metric("logprob").score(logits)  # the loss (−logprob) increase
            got = result.values[result.labels[0].index(f"L{layer}H{head}")]
            assert abs(float(got) - float(expected)) < 1e-4


def test_roc_of_a_sweep_by_hand():
    g = ComputeGraph.build(1, 2)
    truth = Circuit(g, torch.full(g.valid.shape, math.nan), torch.zeros_like(g.valid))
    edges = g.edges()
    t_mask = torch.zeros_like(g.valid)
    for e in edges[:3]:
        t_mask[e.src, e.dst] = True
    truth = truth.with_members(t_mask)
    n_neg = g.n_edges - 3

    def circuit(names, threshold):
        m = torch.zeros_like(g.valid)
        for e in names:
            m[e.src, e.dst] = True
        return Circuit(g, torch.full(g.valid.shape, math.nan), m, {"threshold": threshold})

    # TPR 1/3 at FPR 0, TPR 1 at FPR 1/n_neg: the step frontier's area is 1/3·(1/n) + 1·(1 − 1/n)
    sweep = [circuit(edges[:1], 1.0), circuit(edges[:4], 0.1)]
    r = roc(sweep, truth)
    assert r.fpr.tolist() == [0.0, 1 / n_neg] and r.tpr.tolist() == [1 / 3, 1.0]
    assert math.isclose(r.auc, (1 / 3) * (1 / n_neg) + (1 - 1 / n_neg))
    assert roc([circuit(edges[:3], 0.5)], truth).auc == 1.0
    assert step_auc(torch.tensor([0.5]), torch.tensor([0.5])) == 0.25
    with pytest.raises(ValueError, match="distinct"):
        roc([circuit(edges[:1], 0.1), circuit(edges[:2], 0.1)], truth)
    with pytest.raises(ValueError, match="nan"):
        roc([circuit(edges[:1], math.nan)], truth)
    # node level: the truth uses tok_embed/pos_embed and the heads its first three edges enter
    nodes = circuit_nodes(truth)
    assert nodes.dtype == torch.bool and nodes.shape == (g.n_sources,)


def test_roc_node_level_of_scores_matches_edges(planted):
    """A node's score is its largest |edge score|; a perfect edge ranking is a perfect node ranking."""
    known = residual_circuit(planted, heads=[planted.planted.previous_token, planted.planted.induction])
    scores = known.members.float() + 0.01 * torch.rand(known.members.shape)
    assert roc(scores, known).auc == 1.0
    assert roc(scores, known, level="node").auc == 1.0
    task = induction_task(6, 5, planted.cfg.d_vocab, seed=1)
    r = roc(eap(planted, task, ablation="zero", ig_steps=4), known)
    assert 0.0 <= r.auc <= 1.0


def test_known_circuit_refuses_layernorm(tiny2):
    with pytest.raises(ValueError, match="LayerNorm"):
        residual_circuit(tiny2)


def test_benchmark_rows_on_hist(compiled):
    from analyses.discovery_benchmark import Case, auc_figure, evaluate, markdown_table

    _, model = compiled["hist"]
    pt = program_task(model)
    case = Case("tracr hist", model, pt.task, residual_circuit(model), pt.metrics)
    rows = evaluate(case, "zero", "kl", (1.0, 1e-2, 1e-6), progress=False)
    assert [r["method"] for r in rows] == ["ACDC", "EAP", "EAP-IG", "node patching"]
    assert rows[0]["edge_auc"] == 1.0 and rows[0]["exact_at_smallest"]
    assert "| tracr hist | zero | kl |" in markdown_table(rows)
    assert len(auc_figure(rows).data) == 8


@pytest.mark.slow
def test_benchmark_short_end_to_end(tmp_path):
    """`python -m analyses.discovery_benchmark --short`: the table, summary and report; ACDC with zero
    ablation finds every active known edge and nothing else on every model (edge AUC 1 against them)."""
    import json

    from analyses import discovery_benchmark

    discovery_benchmark.main(["--short", "--quiet", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "table.md").read_text().count("\n") > 30
    rows = summary["rows"]
    assert {r["model"] for r in rows} == {"planted induction", "tracr reverse", "tracr frac_prevs", "tracr hist"}
    assert len(rows) == 4 * 2 * 4  # models × ablations × methods (short: one metric per model)
    for r in rows:
        if r["method"] == "ACDC" and r["ablation"] == "zero":
            assert r["active_auc"] == 1.0 and r["active_at_smallest"], r
