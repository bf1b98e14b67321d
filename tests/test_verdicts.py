"""The lens verdicts of `circuits.verdicts`: on attn2l-induction the three lenses agree, and on the heads its card
measured from attention patterns (a known answer); the evidence they report equals what the methods return."""

from __future__ import annotations

import json

import pytest
import torch

from circuits.models import attn_only
from circuits.models.zoo import load_pretrained, model_card
from circuits.verdicts import (
    check_behaviour,
    induction_task_for,
    induction_verdicts,
    pattern_verdict,
    weights_verdict,
)
from circuits.weights import composition_scores


@pytest.fixture(scope="module")
def model():
    return load_pretrained("attn2l-induction")


@pytest.fixture(scope="module")
def found(model):
    return induction_verdicts(model, induction_task_for(model, batch=8, seed=0))


def test_the_three_lenses_name_the_cards_heads_on_attn2l_induction(found):
    """Weights, activations and discovery each name the card's previous-token head and one of its induction heads
    (the card measured them from attention patterns on a forward pass, independently of the lenses)."""
    card = model_card("attn2l-induction")
    prev = {f"L{layer}H{head}" for layer, head in card["previous_token_heads"]}
    ind = {f"L{layer}H{head}" for layer, head in card["induction_heads"]}
    agree = found.agreement()
    assert agree["previous_token_head"]["agree"] and agree["induction_head"]["agree"], agree
    for verdict in found.verdicts.values():
        assert verdict.previous_token_head in prev and verdict.induction_head in ind, verdict
    assert found.patterns.previous_token_head in prev and found.patterns.induction_head in ind


def test_the_evidence_is_what_the_methods_return(model, found):
    """Each lens's number for the agreed heads equals the method's own output (recomputed here)."""
    w, a = found.verdicts["weights"], found.verdicts["activations"]
    z = composition_scores(model, "K").zscores[0, :, 1, :]
    prev, ind = int(w.previous_token_head[-1]), int(w.induction_head[-1])
    assert w.evidence["top_k_composition_by_zscore"][0][2] == pytest.approx(float(z.max()))
    assert float(z[prev, ind]) == pytest.approx(float(z.max()))
    noising = a.results["noising"].values
    assert a.evidence["noising_cost"][a.previous_token_head] == pytest.approx(float(1 - noising[0].min()), abs=1e-4)
    contest = found.contest("induction_head")
    assert list(contest) == [w.induction_head]
    row = contest[w.induction_head]
    assert row["weights"] == pytest.approx(float(z[:, ind].max()), abs=1e-3)
    assert row["activations"] == a.evidence["noising_cost"][w.induction_head]
    assert row["attention patterns"] == found.patterns.evidence["induction_score"] > 0.4
    assert row["discovery"] == abs(found.verdicts["discovery"].evidence["acdc_k_edges_from_layer0"][0][2])


def test_the_summary_is_json(found):
    summary = json.loads(json.dumps(found.as_dict()))
    assert summary["behaviour"]["present"] and set(summary["lenses"]) == {"weights", "activations", "discovery"}
    assert set(summary["contest"]) == {"previous_token_head", "induction_head"}


def test_a_model_without_the_behaviour_gets_no_verdict():
    random2l = attn_only(2, 64, 4, 16, d_vocab=64, n_ctx=64, seed=3)
    task = induction_task_for(random2l, batch=8)
    found = induction_verdicts(random2l, task)
    assert not check_behaviour(random2l, task).present
    assert found.verdicts is None and found.agreement() is None and found.contest("induction_head") == {}
    assert found.as_dict()["lenses"] is None


def test_bad_inputs_are_refused(model):
    one_layer = attn_only(1, 32, 4, 8, d_vocab=24, n_ctx=20, seed=1)
    with pytest.raises(ValueError, match="model: .*2 layers"):
        weights_verdict(one_layer)
    with pytest.raises(ValueError, match="threshold"):
        induction_verdicts(model, induction_task_for(model, batch=4), threshold=-1.0)
    with pytest.raises(ValueError, match="role"):
        induction_verdicts(attn_only(2, 32, 4, 8, d_vocab=24, n_ctx=20, seed=1)).contest("copying_head")
    with pytest.raises(ValueError, match="half_len"):
        pattern_verdict(model, _odd_task(model))


def _odd_task(model):
    """An induction task whose rows are not [BOS, x, x] (one token longer)."""
    from dataclasses import replace

    task = induction_task_for(model, batch=2)
    extra = torch.ones(task.batch, 1, dtype=torch.long)
    return replace(task, clean=torch.cat([task.clean, extra], 1), corrupted=torch.cat([task.corrupted, extra], 1))


def test_the_library_never_imports_the_analyses():
    """`circuits` (the zoo's cards included) reads the verdicts from `circuits.verdicts`, never from `analyses`."""
    import ast
    from pathlib import Path

    import circuits

    found = []
    for path in Path(circuits.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n == "analyses" or n.startswith("analyses.")]
    assert not found, found


def test_the_report_says_where_the_lenses_disagree_with_each_lens_number(found):
    """The flagship's side-by-side section on two models, one of them with the activations lens made to name
    another previous-token head: the disagreement is marked and stated with every lens's number for both heads."""
    from dataclasses import replace

    from analyses.induction import contest_text, side_by_side

    other = "L0H0" if found.verdicts["weights"].previous_token_head != "L0H0" else "L0H1"
    moved = replace(found, verdicts={**found.verdicts,
                                     "activations": replace(found.verdicts["activations"], previous_token_head=other)})
    assert not moved.agreement()["previous_token_head"]["agree"] and moved.agreement()["induction_head"]["agree"]
    contest = moved.contest("previous_token_head")
    assert set(contest) == {found.verdicts["weights"].previous_token_head, other}
    assert contest[other]["activations"] == found.verdicts["activations"].evidence["noising_cost"][other]
    text = contest_text(moved)
    assert "disagree on the previous-token head" in text and "induction head:" not in text
    assert f"{other}: best K-composition z {contest[other]['weights']:.3g}" in text
    section = side_by_side({"agreeing": found, "moved": moved})
    marks = [row[-1] for row in section.table[1:]]
    assert marks == ["✓ agree", "✓ agree", "✗ disagree", "✓ agree"]
    assert "agreeing: The three lenses agree on both heads." in section.text
