"""EAP and EAP-IG: exact on edges the metric is linear in, the planted circuit ranked first (ROC AUC 1),
faithfulness and its curve against edge patching, ROC against a brute-force pair count, bad input."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch

from circuits.graph import Circuit, ComputeGraph, eap, faithfulness, faithfulness_curve, roc
from circuits.graph.metric import resolve_metric
from circuits.graph.patching import EdgePatcher
from circuits.models import planted_induction
from circuits.tasks import induction_task

# the planted edges whose source differs between clean and corrupted induction inputs (see test_graph_acdc.py)
PLANTED_RESAMPLE = [("tok_embed", "L0H2.v"), ("L0H2", "L1H1.k"), ("tok_embed", "L1H1.v"), ("L1H1", "logits")]


@pytest.fixture(scope="module")
def task24():
    return induction_task(6, 9, 24, seed=4)


@pytest.fixture(scope="module")
def planted_task():
    return induction_task(12, 10, 32, seed=0)


def patched_minus_clean(model, task, edges, ablation="resample", metric="logit_diff"):
    """metric(one edge removed) − metric(clean) by edge patching, for each (source, destination)."""
    p = EdgePatcher(model, task, ablation)
    gm = resolve_metric(task, metric, p.clean_logits_full)
    masks = p.graph.valid[None].repeat(len(edges) + 1, 1, 1)
    for i, (s, d) in enumerate(edges):
        e = p.graph.edge(s, d)
        masks[i, e.src, e.dst] = False
    values = gm(p.run(masks))
    return values[:-1] - values[-1]


def linear_edges(graph: ComputeGraph, *, values: bool = True) -> list[tuple[str, str]]:
    """Edges the logit difference is linear in for a model without LayerNorm: into the logits (the metric is
    linear in the unembedding's input) and, if `values`, into the last layer's v inputs (its heads' outputs
    reach only the logits, and a head's output is linear in its values for a fixed pattern, which v does not
    change)."""
    last = graph.n_layers - 1
    return [(e.source.name, e.destination.name) for e in graph.edges()
            if e.destination.name == "logits" or (values and e.destination.layer == last and e.destination.qkv == "v")]


@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
@pytest.mark.parametrize("ig_steps", [0, 3])
def test_eap_equals_edge_patching_where_linear(tiny2_noln, task24, ablation, ig_steps):
    r = eap(tiny2_noln, task24, ig_steps=ig_steps, ablation=ablation, metric="logit_diff")
    g = ComputeGraph.of(tiny2_noln)
    # EAP-IG's gradient at the v inputs is taken along the path of interpolated embeddings, on which the last
    # layer's patterns move: only the logits edges have a gradient that is constant along it
    edges = linear_edges(g, values=ig_steps == 0)
    assert len(edges) == 10 + (4 * 6 if ig_steps == 0 else 0)
    oracle = patched_minus_clean(tiny2_noln, task24, edges, ablation)
    ours = torch.tensor([float(r.values[g.edge(s, d).src, g.edge(s, d).dst]) for s, d in edges])
    scale = float(oracle.abs().max())
    assert scale > 1e-4  # the edges do something (a random model's effects are small)
    assert (ours - oracle).abs().max() < 1e-3 * scale + 1e-7


def test_eap_equals_edge_patching_where_linear_planted(planted, planted_task):
    """The planted model has no LayerNorm: its logits and last-layer v edges are linear too, with large effects."""
    for ig_steps in (0, 5):
        r = eap(planted, planted_task, ig_steps=ig_steps, ablation="zero", metric="logit_diff")
        g = ComputeGraph.of(planted)
        edges = linear_edges(g, values=ig_steps == 0)
        oracle = patched_minus_clean(planted, planted_task, edges, "zero")
        ours = torch.tensor([float(r.values[g.edge(s, d).src, g.edge(s, d).dst]) for s, d in edges])
        assert oracle.abs().max() > 10.0
        assert (ours - oracle).abs().max() < 1e-4


def planted_truth(graph: ComputeGraph) -> torch.Tensor:
    truth = torch.zeros_like(graph.valid)
    for s, d in PLANTED_RESAMPLE:
        e = graph.edge(s, d)
        truth[e.src, e.dst] = True
    return truth


def test_eap_ig_ranks_the_planted_edges_first(planted, planted_task):
    g = ComputeGraph.of(planted)
    truth = planted_truth(g)
    for steps in (4, 16):
        r = eap(planted, planted_task, ig_steps=steps)
        assert roc(r, truth, g.valid).auc == 1.0
        assert {e for e, _ in r.top(4)} == set(PLANTED_RESAMPLE)


def test_eap_ranks_the_planted_edges_first_unless_attention_saturates(planted_task):
    """Plain EAP is a gradient at the clean run. With a soft previous-token pattern it ranks the planted edges
    first; with the default sharp one (score 16, softmax saturated) the gradient through the induction head's
    key and the previous-token head's value vanishes and those two edges fall among the inert ones, which
    is what EAP-IG repairs (test above)."""
    soft = planted_induction(sharpness=8.0)
    g = ComputeGraph.of(soft)
    assert roc(eap(soft, planted_task), planted_truth(g), g.valid).auc == 1.0
    sharp = planted_induction()
    r = eap(sharp, planted_task)
    assert roc(r, planted_truth(g), g.valid).auc < 1.0
    assert {e for e, _ in r.top(2)} == {("tok_embed", "L1H1.v"), ("L1H1", "logits")}
    k_edge = g.edge("L0H2", "L1H1.k")
    assert abs(float(r.values[k_edge.src, k_edge.dst])) < 1e-2


def test_faithfulness_oracles(tiny2, task24):
    g = ComputeGraph.of(tiny2)
    full = faithfulness(tiny2, task24, Circuit.full(g))
    assert full.normalised == pytest.approx(1.0, abs=1e-6)
    assert full.n_edges == g.n_edges
    empty = faithfulness(tiny2, task24, Circuit.full(g).with_members(torch.zeros_like(g.valid)))
    assert empty.normalised == pytest.approx(0.0, abs=1e-6)
    # the run values are the task metric of the clean and corrupted runs (resample ablation)
    with torch.no_grad():
        clean, corrupted = task24.score(tiny2(task24.clean)), task24.score(tiny2(task24.corrupted))
    assert float(full.values[1]) == pytest.approx(float(clean), abs=1e-4)
    assert float(full.values[2]) == pytest.approx(float(corrupted), abs=1e-4)


def test_faithfulness_curve_equals_faithfulness_of_each_top_n(tiny2, task24):
    r = eap(tiny2, task24)
    ns = [0, 3, 10, 40, ComputeGraph.of(tiny2).n_edges]
    curve = faithfulness_curve(tiny2, task24, r, ns)
    one_by_one = [faithfulness(tiny2, task24, r.top_n(n)).normalised for n in ns]
    assert curve.n_edges == tuple(ns)
    assert torch.allclose(curve.values, torch.tensor(one_by_one), atol=1e-5)
    assert curve.values[0] == pytest.approx(0.0, abs=1e-6) and curve.values[-1] == pytest.approx(1.0, abs=1e-6)


def test_roc_against_pair_count():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 9, generator=gen).round(decimals=1)  # ties on purpose
    truth = torch.rand(7, 9, generator=gen) < 0.3
    valid = torch.rand(7, 9, generator=gen) < 0.8
    r = roc(scores, truth, valid)
    s, t = scores.abs()[valid].tolist(), truth[valid].tolist()
    pos = [a for a, y in zip(s, t) if y]
    neg = [a for a, y in zip(s, t) if not y]
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))
    assert r.auc == pytest.approx(brute, abs=1e-12)
    # the curve runs from (0, 0) to (1, 1), monotone, and its trapezoid area is the AUC
    assert (r.fpr[0], r.tpr[0], r.fpr[-1], r.tpr[-1]) == (0, 0, 1, 1)
    assert (r.fpr.diff() >= 0).all() and (r.tpr.diff() >= 0).all()
    assert float(torch.trapezoid(r.tpr, r.fpr)) == pytest.approx(brute, abs=1e-6)


def test_eap_result_contents(tiny2, task24):
    r = eap(tiny2, task24, ig_steps=2)
    g = ComputeGraph.of(tiny2)
    assert r.dims == ("source", "destination") and r.values.shape == g.valid.shape
    assert torch.isnan(r.values[~g.valid]).all() and torch.isfinite(r.values[g.valid]).all()
    assert r.method == "eap-ig" and r.info["ig_steps"] == 2
    dg = r.to_networkx()
    assert isinstance(dg, nx.DiGraph) and dg.graph["method"] == "eap-ig"
    assert sum(1 for *_, a in dg.edges(data=True) if a["kind"] == "residual") == g.n_edges
    assert r.top_n(5).n_edges == 5
    assert all(not math.isnan(v) for _, v in r.top(5))


def test_bad_input(tiny2, tiny2_noln, task24, planted, planted_task):
    with pytest.raises(ValueError, match="ig_steps: expected an integer >= 0"):
        eap(tiny2, task24, ig_steps=-1)
    with pytest.raises(ValueError, match="metric: expected a callable returning a scalar"):
        eap(tiny2, task24, metric=lambda logits: logits.sum(-1))
    circuit = eap(tiny2, task24).top_n(10)
    # same shape, other weights: the fingerprint tells them apart
    with pytest.raises(ValueError, match="circuit: made for another model"):
        faithfulness(tiny2_noln, task24, circuit)
    with pytest.raises(ValueError, match="circuit: made for another model"):
        faithfulness(tiny2_noln, task24, circuit.to_networkx())
    with pytest.raises(ValueError, match="circuit: made for a model with 2 layers × 4 heads"):
        faithfulness(planted, planted_task, circuit)
    with pytest.raises((ValueError, TypeError), match="circuit"):  # the annotation (run-time checks) or our check
        faithfulness(tiny2, task24, {"edges": []})
    with pytest.raises(ValueError, match="truth: needs at least one edge"):
        roc(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="truth"):
        roc(torch.ones(2, 2), torch.zeros(3, 2, dtype=torch.bool))


def split_input_gradients(model, task, emb_rows):
    """Reference: ∂metric/∂x_d by autograd through the edge-patching engine's forward, in which every head's
    q, k and v input is a tensor of its own (no hand-written LayerNorm backward)."""
    p = EdgePatcher(model, task)
    gm = resolve_metric(task, None, p.clean_logits_full)
    with torch.enable_grad():
        run = p.forward(emb_rows.clone().requires_grad_(True), p.graph.valid[None], keep=True)  # split inputs
        grads = torch.autograd.grad(gm.fn(run.logits).sum(), run.stage_inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, run.stage_inputs)]
    return torch.cat(grads, dim=1).sum(0)


def _build(request, model_name):
    from circuits.models import ModelSpec, build, random_gpt2
    from circuits.models.random_hf import random_llama

    if model_name == "mlp3":
        return build(ModelSpec(3, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=3)
    if model_name == "gpt2_perturbed":
        return random_gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=24, n_ctx=24, perturb=True)
    if model_name == "llama":
        return random_llama(n_layers=2, d_vocab=24, n_ctx=24)
    return request.getfixturevalue(model_name)


@pytest.mark.parametrize("model_name", ["tiny2", "tiny2_noln", "mlp3", "gpt2_perturbed", "llama"])
@pytest.mark.parametrize("runs", [(1,), (2,), (1, 1)], ids=["one-run", "two-runs", "two-chunks"])
def test_destination_gradients_equal_autograd_through_split_inputs(request, task24, model_name, runs):
    """The gradient at every destination's input, summed over the runs, that EAP forms in the backward of each
    layer's norm and q/k/v product (with one run the head inputs' gradients also make the residual stream's,
    so a wrong one would show in the layers below), equals autograd through the edge-patching forward in which
    every head input is a tensor of its own: one run, two runs in one batch, and two runs in two batches (the
    second adds to the first's sums)."""
    from circuits.graph.eap import attribute
    from circuits.graph.forward import Weights, embed

    model = _build(request, model_name)
    w, g = Weights.of(model), ComputeGraph.of(model)
    emb = torch.stack([embed(w, task24.clean), 0.5 * embed(w, task24.corrupted)])[: sum(runs)]
    chunks = list(emb.split(list(runs)))
    zero = torch.zeros(g.n_sources, *emb.shape[2:])
    ours = attribute(w, g, chunks, lambda run, e: zero, task24.positions, task24, None, keep_gradients=True).gradients
    reference = split_input_gradients(model, task24, emb)
    assert reference.abs().max() > 1e-4
    assert (ours - reference).abs().max() < 1e-5 * float(reference.abs().max()) + 1e-8


@pytest.mark.parametrize("model_name", ["tiny2", "tiny2_noln", "mlp3", "gpt2_perturbed", "llama"])
def test_edge_scores_equal_differences_times_autograd_gradients(request, task24, model_name):
    """EAP sums the head inputs' gradients over runs before projecting them, applies each norm's Jacobian as a
    rank-k correction and meets two layers' destinations with the differences at once; the scores must equal
    Σ diff_s · (gradient at d's input by autograd through split inputs, summed over the runs), with three runs
    in two batches (the k rows of EAP-IG), on LayerNorms with a weight and bias away from 1 and 0 (GPT-2
    perturbed) and on RMSNorm with grouped-query attention and rotary (LLaMA)."""
    from circuits.graph.eap import attribute
    from circuits.graph.forward import Weights, embed

    model = _build(request, model_name)
    w, g = Weights.of(model), ComputeGraph.of(model)
    clean, corrupted = embed(w, task24.clean), embed(w, task24.corrupted)
    emb = torch.stack([clean, 0.5 * (clean + corrupted), corrupted])  # three runs, summed
    p = EdgePatcher(model, task24)
    diff = p.ablated - p.clean_sources
    ours = attribute(w, g, [emb[:2], emb[2:]], lambda run, e: diff, task24.positions, task24, None).scores.double()
    dense = split_input_gradients(model, task24, emb).double()
    reference = (diff.flatten(1).double() @ dense.flatten(1).T).masked_fill(~g.valid, 0.0)
    assert reference.abs().max() > 1e-5  # GPT-2's initialisation (std 0.02) gives the smallest, about 4e-5
    assert (ours - reference).abs().max() < 1e-5 * float(reference.abs().max())


@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
def test_source_differences_equal_the_edge_patchers(task24, ablation):
    """The sources' ablated-minus-clean outputs EAP forms (heads as (z_ablated − z) W_O; under resample the
    corrupted run's attention output from the clean run's plus its heads' differences) equal the edge patcher's
    ablated minus clean sources, on a model with MLPs. The last layer's sources are compared at the metric
    positions, the only ones whose queries EAP computes (its heads' differences are 0 elsewhere, and its MLP
    there, which reaches nothing the metric reads, lacks their output)."""
    from circuits.engine.run import forward
    from circuits.graph.eap import _ablated_embeddings, source_differences
    from circuits.graph.forward import Weights, embed
    from circuits.graph.patching import _ablation
    from circuits.models import ModelSpec, build

    model = build(ModelSpec(3, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=3)
    w, g = Weights.of(model), ComputeGraph.of(model)
    abl = _ablation(ablation)
    clean = embed(w, task24.clean)
    run = forward(w, clean.sum(0)[None], record=("z", "attn_out", "mlp"), queries=task24.positions)
    ours = source_differences(w, g, run, clean[None], _ablated_embeddings(w, abl, clean, task24.corrupted), abl,
                              task24.positions)
    p = EdgePatcher(model, task24, ablation)
    reference = p.ablated - p.clean_sources
    heads = [g.source_names.index(f"L2H{h}") for h in range(4)]
    last = heads + [g.source_names.index("MLP2")]
    other = torch.ones(g.n_sources, dtype=torch.bool)
    other[last] = False
    scale = float(reference.abs().max())
    assert (ours[other] - reference[other]).abs().max() < 1e-5 * scale
    at = task24.positions
    assert (ours[last][:, :, at] - reference[last][:, :, at]).abs().max() < 1e-5 * scale
    away = torch.ones(task24.seq_len, dtype=torch.bool)
    away[at] = False
    assert float(ours[heads][:, :, away].abs().max()) == 0.0
    assert float(reference[heads][:, :, at].abs().max()) > 1e-3 * scale  # the last layer's heads are compared


def test_forward_with_its_steps_given_equals_the_forward():
    """The recorder's `qkv_from` and `attn_out_from` replace ln1 with the q/k/v product and the W_O product;
    given the same computations, the record is the same, and a different `attn_out_from` changes the run."""
    from circuits.engine.run import forward
    from circuits.graph.forward import Weights, embed
    from circuits.models import ModelSpec, build

    model = build(ModelSpec(2, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=5)
    w = Weights.of(model)
    resid = embed(w, torch.randint(0, 24, (2, 7))).sum(0)

    def qkv(layer, x):
        return torch.addmm(w.b_QKV[layer], w.ln1.at(layer)(x).reshape(-1, x.shape[-1]), w.W_QKV[layer])

    def attn_out(layer, z):
        return torch.einsum("bqhe,hed->bqd", z, w.W_O[layer]) + w.b_O[layer]

    plain = forward(w, resid, record=("z", "mlp"))
    given = forward(w, resid, record=("z", "mlp"), qkv_from=qkv, attn_out_from=attn_out)
    assert (plain.final - given.final).abs().max() < 1e-5 * float(plain.final.abs().max())
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(plain.z, given.z))
    shifted = forward(w, resid, record=(), attn_out_from=lambda layer, z: attn_out(layer, z) + 1.0)
    assert (shifted.final - plain.final).abs().max() > 0.1
