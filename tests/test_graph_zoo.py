"""Circuit discovery on the trained zoo model `attn2l-induction`: ACDC finds the K-composition of the card's
previous-token heads with its induction heads, and the circuit keeps most of the logit difference."""

from __future__ import annotations

import pytest
import torch

from circuits.graph import ComputeGraph, acdc, eap, faithfulness
from circuits.models.zoo import available, load_pretrained, model_card
from circuits.tasks import induction_task

pytestmark = pytest.mark.skipif("attn2l-induction" not in available(), reason="zoo checkpoint not built")


@pytest.fixture(scope="module")
def zoo():
    return load_pretrained("attn2l-induction"), model_card("attn2l-induction")


@pytest.fixture(scope="module")
def task():
    return induction_task(32, 20, 64, seed=0)


def test_acdc_finds_previous_token_to_induction_key_edges(zoo, task):
    model, card = zoo
    r = acdc(model, task, threshold=0.01, metric="kl", ablation="resample", progress=False)
    prev = {f"L{layer}H{h}" for layer, h in card["previous_token_heads"]}
    induction_keys = {f"L{layer}H{h}.k" for layer, h in card["induction_heads"]}
    k_edges = {(u, v) for u, v in r.graph.edges if u in prev and v in induction_keys}
    assert ("L0H3", "L1H0.k") in k_edges  # the strongest previous-token head into an induction head's key
    assert len(k_edges) >= len(card["induction_heads"])  # every induction head's key reads one
    # the induction heads write to the logits and the circuit is a small part of the graph
    assert {f"L{layer}H{h}" for layer, h in card["induction_heads"]} <= {u for u, v in r.graph.edges if v == "logits"}
    assert r.circuit.n_edges < ComputeGraph.of(model).n_edges / 2
    # it keeps most of the logit difference (the faithfulness is measured under the same resample ablation)
    assert faithfulness(model, task, r.graph, metric="logit_diff").normalised > 0.8


def test_eap_ranks_induction_edges_high(zoo, task):
    model, card = zoo
    r = eap(model, task, ig_steps=8)
    top = {e for e, _ in r.top(12)}
    assert {(f"L{layer}H{h}", "logits") for layer, h in card["induction_heads"]} <= top
    assert any(s == "L0H3" and d.endswith(".k") for s, d in top)
    assert torch.isfinite(r.values[ComputeGraph.of(model).valid]).all()
