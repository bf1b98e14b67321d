"""ACDC: exact mode against the plain algorithm (one full forward per edge, `helpers.reference_acdc`), the planted
circuits, the batched mode, bad input."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from helpers import reference_acdc

from circuits.graph import ComputeGraph, acdc, faithfulness
from circuits.models import ModelSpec, build
from circuits.tasks import induction_task


@pytest.fixture(scope="module")
def task24():
    return induction_task(6, 9, 24, seed=2)


@pytest.mark.parametrize("threshold", [1e-4, 1e-3, 3e-3, 0.01])
def test_exact_mode_equals_plain_algorithm(tiny2, task24, threshold):
    ours = acdc(tiny2, task24, metric="kl", threshold=threshold, progress=False)
    mask, n_forwards = reference_acdc(tiny2, task24, metric="kl", threshold=threshold)
    assert torch.equal(ours.circuit.members, mask)
    assert ours.circuit.n_edges > 0  # a non-trivial circuit (random models have small effects)
    assert ours.info["n_batches"] < n_forwards


@pytest.mark.parametrize("threshold,metric,ablation,order", [
    (0.001, "kl", "zero", "latest_first"), (0.01, "kl", "zero", "earliest_first"),
    (1e-4, "logit_diff", "mean", "earliest_first"), (0.003, "logit_diff", "mean", "latest_first"),
    (0.001, "kl", "resample", "earliest_first"),
])
def test_exact_mode_equals_plain_algorithm_other_settings(tiny2, task24, threshold, metric, ablation, order):
    ours = acdc(tiny2, task24, threshold=threshold, metric=metric, ablation=ablation, order=order, progress=False)
    mask, _ = reference_acdc(tiny2, task24, threshold=threshold, metric=metric, ablation=ablation, order=order)
    assert torch.equal(ours.circuit.members, mask)
    assert 0 < ours.circuit.n_edges < ComputeGraph.of(tiny2).n_edges


# threshold 1e-9: a dense circuit (every edge that carries a difference stays), the incremental path that reads
# alike inputs once and the total change minus the cut sources
@pytest.mark.parametrize("threshold,ablation", [(0.001, "resample"), (0.003, "zero"), (0.03, "zero"),
                                                (1e-9, "resample"), (1e-9, "zero")])
def test_exact_mode_equals_plain_algorithm_with_mlps(task24, threshold, ablation):
    model = build(ModelSpec(2, 32, 2, 8, 24, 20, d_mlp=48, act_fn="gelu"), seed=5)
    ours = acdc(model, task24, metric="kl", threshold=threshold, ablation=ablation, progress=False)
    mask, _ = reference_acdc(model, task24, metric="kl", threshold=threshold, ablation=ablation)
    assert torch.equal(ours.circuit.members, mask)
    assert ours.circuit.n_edges > 0


# The planted model (circuits/models/planted.py): no LayerNorm, one-hot subspaces TOK, POS, PREV, OUT.
# Previous-token head L0H2: its query and key read POS only (W_Q, W_K are zero outside POS), its value reads
# TOK and writes PREV. Induction head L1H1: query reads TOK, key reads PREV (written only by L0H2), value
# reads TOK and writes OUT, the only subspace W_U reads. So under zero ablation the circuit needs exactly:
PLANTED_ZERO = {
    "pos_embed->L0H2.q", "pos_embed->L0H2.k",  # position i attends to i−1 by POS alone
    "tok_embed->L0H2.v",                       # what it moves is the token
    "L0H2->L1H1.k",                            # PREV, the key the induction head matches (K-composition)
    "tok_embed->L1H1.q",                       # the current token, the query
    "tok_embed->L1H1.v",                       # the token copied
    "L1H1->logits",                            # OUT, read by W_U
}
# Nothing else is required: tok_embed and pos_embed write TOK/POS, which W_U ignores; the four inert heads
# have 0.02-scale weights. Under resample ablation on induction_task (clean [BOS, x, x], corrupted
# [BOS, y, x]) an edge matters only if its source differs where it is read: positions are identical, so
# both pos_embed edges carry nothing, and the induction head's query reads the second half, whose tokens
# are the same in both runs, so tok_embed->L1H1.q carries nothing either.
PLANTED_RESAMPLE = {"tok_embed->L0H2.v", "L0H2->L1H1.k", "tok_embed->L1H1.v", "L1H1->logits"}


@pytest.fixture(scope="module")
def planted_task():
    return induction_task(12, 10, 32, seed=0)


@pytest.mark.parametrize("threshold", [1e-3, 0.01, 0.1, 1.0])
def test_planted_zero_ablation_gives_the_planted_circuit(planted, planted_task, threshold):
    assert planted.planted.previous_token == (0, 2) and planted.planted.induction == (1, 1)
    r = acdc(planted, planted_task, metric="kl", threshold=threshold, ablation="zero", progress=False)
    assert set(r.edges) == PLANTED_ZERO
    residual = {f"{u}->{v}" for u, v, a in r.graph.edges(data=True) if a["kind"] == "residual"}
    assert residual == PLANTED_ZERO
    assert set(r.graph.nodes) == {"tok_embed", "pos_embed", "L0H2", "L0H2.q", "L0H2.k", "L0H2.v", "L1H1",
                                  "L1H1.q", "L1H1.k", "L1H1.v", "logits"}
    assert r.graph.graph["method"] == "acdc" and r.graph.graph["ablation"] == "zero"
    assert faithfulness(planted, planted_task, r.graph).normalised == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("threshold", [1e-3, 0.1, 1.0])
def test_planted_resample_ablation_keeps_edges_that_carry_a_difference(planted, planted_task, threshold):
    r = acdc(planted, planted_task, metric="kl", threshold=threshold, ablation="resample", progress=False)
    assert set(r.edges) == PLANTED_RESAMPLE
    # the edges ACDC dropped as carrying no difference really change nothing
    assert r.values[0, ComputeGraph.of(planted).edge("pos_embed", "L0H2.q").dst].abs() < 1e-6


def test_edges_that_carry_nothing_are_removed_without_a_forward(tiny2, task24, monkeypatch):
    """Under resample ablation on an induction task the positional embedding is the same in both runs, and the
    token embedding is the same at the metric positions (the second half): every pos_embed edge, and the
    tok_embed edges into the last layer's queries and the logits, change nothing. Exact mode removes them with
    a score of exactly 0 and spends no forward on them, making the plain algorithm's decisions (which measure
    float rounding there, far below the threshold). With threshold 0 they are tested like every other edge."""
    acdc_module = importlib.import_module("circuits.graph.acdc")  # the package exports the function `acdc`
    g = ComputeGraph.of(tiny2)
    evaluated = []  # (destination, candidate columns) of every batched evaluation

    def spy(patcher, state, d, columns):
        evaluated.append((d, columns.clone()))
        return evaluate_columns(patcher, state, d, columns)

    evaluate_columns = acdc_module.evaluate_columns
    monkeypatch.setattr(acdc_module, "evaluate_columns", spy)
    ours = acdc(tiny2, task24, metric="kl", threshold=1e-3, progress=False)
    monkeypatch.undo()
    mask, n_plain = reference_acdc(tiny2, task24, metric="kl", threshold=1e-3)
    assert torch.equal(ours.circuit.members, mask)
    inert = [(g.source_names.index("pos_embed"), d) for d in range(g.n_destinations)]
    last = [d for d, node in enumerate(g.destinations) if node.layer == g.n_layers - 1 and node.qkv == "q"]
    inert += [(g.source_names.index("tok_embed"), d) for d in last + [g.destination_names.index("logits")]]
    tested = ~ours.values.isnan()
    assert all(ours.values[s, d] == 0.0 and not ours.circuit.members[s, d] for s, d in inert if tested[s, d])
    assert sum(bool(tested[s, d]) for s, d in inert) >= 20
    # no forward tested an inert edge: every candidate evaluated already has them removed
    assert all(not columns[:, s].any() for d, columns in evaluated for s, d2 in inert if d2 == d)
    # threshold 0: measured by a forward like the rest (a rounding-sized score, its sign deciding; the plain
    # algorithm's own rounding then decides differently for some, so there is no circuit to compare)
    at_zero = acdc(tiny2, task24, metric="kl", threshold=0.0, progress=False)
    s, d = inert[0]  # pos_embed -> the first destination, the last one visited: never dropped unvisited
    assert not math.isnan(at_zero.values[s, d]) and abs(at_zero.values[s, d]) < 1e-5


def test_result_contents(tiny2, task24):
    r = acdc(tiny2, task24, metric="kl", threshold=0.02, progress=False)
    g = ComputeGraph.of(tiny2)
    assert r.values.shape == (g.n_sources, g.n_destinations)
    assert r.dims == ("source", "destination")
    assert torch.isnan(r.values[~g.valid]).all()
    assert r.n_forwards > 1 and r.info["n_batches"] >= 1
    assert r.graph.graph["threshold"] == 0.02 and r.graph.graph["model"].startswith("attn-only 2L×4H")
    kept = r.circuit.members
    assert (r.values[kept & ~r.values.isnan()] >= 0.02).all()  # kept edges raised the loss by >= threshold
    assert all(not math.isnan(v) for _, v in r.top(3))
    # the walk runs in inference mode; what it returns are ordinary tensors (editable, usable with autograd)
    assert not r.values.is_inference() and not r.circuit.members.is_inference()


def test_bad_input(tiny2, task24, capsys):
    with pytest.raises(ValueError, match="threshold: expected a number >= 0"):
        acdc(tiny2, task24, metric="kl", threshold=-0.1)
    with pytest.raises((ValueError, TypeError), match="mode"):
        acdc(tiny2, task24, metric="kl", threshold=0.1, mode="fast")
    with pytest.raises(ValueError, match="metric: expected a callable returning a scalar"):
        acdc(tiny2, task24, threshold=0.1, metric=lambda logits: logits.mean(-1))
    with pytest.raises(ValueError, match="metric must be one of"):
        acdc(tiny2, task24, threshold=0.1, metric="accuracy")
    acdc(tiny2, task24, metric="kl", threshold=0.5, progress=False)
    assert capsys.readouterr().out == ""


def test_custom_metric_reads_like_logit_diff(tiny2_noln, task24):
    """A callable metric is read like logit_diff (higher is better): the logit difference written as a callable
    gives metric='logit_diff''s circuit and scores."""
    t = task24

    def my_logit_diff(logits_at):  # [batch, n, vocab] at the metric positions
        return (logits_at.gather(-1, t.answers[..., None]) - logits_at.gather(-1, t.wrong_answers[..., None])).mean()

    a = acdc(tiny2_noln, t, threshold=1e-4, metric=my_logit_diff, progress=False)
    b = acdc(tiny2_noln, t, threshold=1e-4, metric="logit_diff", progress=False)
    assert torch.equal(a.circuit.members, b.circuit.members) and 0 < a.circuit.n_edges
    torch.testing.assert_close(a.values, b.values, equal_nan=True, rtol=0, atol=1e-5)
    assert a.info["metric"] == "my_logit_diff" and b.info["metric"] == "logit_diff"


def test_default_metric_is_the_tasks(tiny2, task24):
    a = acdc(tiny2, task24, threshold=0.01, progress=False)
    b = acdc(tiny2, task24, threshold=0.01, metric=task24.metric, progress=False)
    assert a.info["metric"] == task24.metric.value == "logit_diff"
    assert torch.equal(a.circuit.members, b.circuit.members)


def test_scores_are_the_metrics_change_and_the_threshold_rule_holds(tiny2, task24):
    """Scores are metric(without the edge) − metric(with it): for logit_diff a kept edge scored <= −threshold
    (removing it cost at least the threshold), for KL >= +threshold; the plain algorithm agrees."""
    for metric, sign in (("logit_diff", -1.0), ("kl", 1.0)):
        r = acdc(tiny2, task24, threshold=0.003, metric=metric, progress=False)
        mask, _ = reference_acdc(tiny2, task24, threshold=0.003, metric=metric)
        assert torch.equal(r.circuit.members, mask)
        kept = r.circuit.members & ~r.values.isnan()
        assert kept.any() and (sign * r.values[kept] >= 0.003).all()


def test_acdc_and_eap_give_an_edge_the_same_sign(planted, planted_task):
    """One sign for every method: on the planted circuit, with logit_diff, ACDC's kept edges and EAP-IG's scores
    of them are both the metric's change when the edge is ablated, negative (the behaviour needs them), so
    `draw_circuit` colours each edge the same for both. With KL, ACDC's are positive. (EAP-IG's per-edge KL
    scores are not compared: KL's gradient vanishes at the clean run, and its path integral splits the total
    among edges with mixed signs.)"""
    from circuits.graph import eap

    found = acdc(planted, planted_task, threshold=0.01, metric="logit_diff", ablation="resample", progress=False)
    assert set(found.edges) == PLANTED_RESAMPLE
    ig = eap(planted, planted_task, ig_steps=16, metric="logit_diff", ablation="resample")
    kept = found.circuit.members
    assert (found.values[kept] < 0).all() and (ig.values[kept] < 0).all()
    colours = [{f"{u}->{v}": d["score"] > 0 for u, v, d in r.graph.edges(data=True)
                if f"{u}->{v}" in PLANTED_RESAMPLE} for r in (found, ig)]
    assert colours[0] == colours[1] and len(colours[0]) == len(PLANTED_RESAMPLE)
    by_kl = acdc(planted, planted_task, threshold=0.01, metric="kl", ablation="resample", progress=False)
    assert set(by_kl.edges) == PLANTED_RESAMPLE and (by_kl.values[by_kl.circuit.members] > 0).all()


def test_acdc_and_eap_share_one_edge_result_interface(planted, planted_task):
    from circuits.graph import Circuit, eap
    from circuits.graph.result import EdgeResult

    found = acdc(planted, planted_task, threshold=0.01, metric="kl", ablation="zero", progress=False)
    scored = eap(planted, planted_task, metric="kl", ablation="zero")
    for r in (found, scored):
        assert isinstance(r, EdgeResult) and isinstance(r.circuit, Circuit)
        residual = {f"{u}->{v}" for u, v, d in r.graph.edges(data=True) if d["kind"] == "residual"}
        assert set(r.edges) == residual and len(r.edges) == r.n_edges == r.circuit.n_edges  # .edges is .graph's
        assert set(r.to_networkx().edges) == set(r.graph.edges) and r.to_networkx() is not r.graph
        assert r.top_n(3).n_edges == 3 and isinstance(r.top_n(3), Circuit)
        top = r.top(4)
        assert len(top) == 4 and all(len(k) == 2 and not math.isnan(v) for k, v in top)
        assert [abs(v) for _, v in top] == sorted((abs(v) for _, v in top), reverse=True)
    assert len(found.edges) == len(PLANTED_ZERO) and found.graph.number_of_edges() > len(found.edges)  # + internal


def test_top_never_ranks_nan_first(planted, planted_task):
    """After a restriction most entries are nan (not computed): top(k) lists only computed ones."""
    from circuits.activations import activation_patch

    r = activation_patch(planted, planted_task, "z", per_position=False, heads=[(1, 1)], progress=False)
    assert r.values.isnan().sum() == r.values.numel() - 1
    top = r.top(3)
    assert top == [(("L1", "H1"), float(r.values[1, 1]))]


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunk_size_bounds_each_call_and_changes_no_decision(tiny2, task24, chunk_size, monkeypatch):
    """Candidates go through calls of at most `chunk_size` columns; the circuit and scores are those of the
    default chunking (and of the plain algorithm)."""
    acdc_module = importlib.import_module("circuits.graph.acdc")
    sizes = []

    def spy(patcher, state, d, columns):
        sizes.append(columns.shape[0])
        return evaluate_columns(patcher, state, d, columns)

    evaluate_columns = acdc_module.evaluate_columns
    monkeypatch.setattr(acdc_module, "evaluate_columns", spy)
    chunked = acdc(tiny2, task24, metric="kl", threshold=1e-3, chunk_size=chunk_size, progress=False)
    monkeypatch.undo()
    assert sizes and max(sizes) <= chunk_size
    default = acdc(tiny2, task24, metric="kl", threshold=1e-3, progress=False)
    assert torch.equal(chunked.circuit.members, default.circuit.members)
    assert torch.equal(chunked.circuit.members, reference_acdc(tiny2, task24, metric="kl", threshold=1e-3)[0])
    tested = ~default.values.isnan()
    assert torch.equal(~chunked.values.isnan(), tested)
    torch.testing.assert_close(chunked.values[tested], default.values[tested], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        acdc(tiny2, task24, metric="kl", threshold=1e-3, chunk_size=0, progress=False)
