"""The analyses end to end: they run, write their report and summary, and their conclusions hold."""

from __future__ import annotations

import json

import pytest

from analyses import bigram_skiptrigram, induction
from circuits.models.zoo import model_card


@pytest.fixture(scope="module")
def induction_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("induction")
    induction.main(["--model", "attn2l-induction", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def induction_summary(induction_run):
    assert (induction_run / "report.html").stat().st_size > 0
    return json.loads((induction_run / "summary.json").read_text())["models"]["attn2l-induction"]


def test_report_opens_with_a_table_of_what_each_lens_names(induction_run, induction_summary):
    page = (induction_run / "report.html").read_text(encoding="utf-8")
    assert page.count('<table class="summary">') == 1
    table = page[page.index('<table class="summary">'):page.index("</table>")]
    for lens in ("weights", "activations", "discovery", "attention patterns (a check)"):
        assert f"<th>{lens}</th>" in table
    named = induction_summary["agreement"]["induction_head"]["named"]["weights"]
    assert f"<td>{named}</td>" in table and table.count('<td class="agree">✓ agree</td>') == 2
    assert induction_summary["behaviour"]["present"] and induction_summary["behaviour"]["gap"] > 1


def test_a_model_without_the_behaviour_names_no_head(tmp_path):
    """A random 2-layer model has no induction behaviour: the analysis says so and names no head."""
    from circuits.models import attn_only, save

    folder = save(attn_only(2, 64, 4, 16, d_vocab=64, n_ctx=64, seed=3), tmp_path / "random2l")
    summary = induction.main(["--model", str(folder), "--out", str(tmp_path / "out"), "--batch", "8"])
    result = summary["models"][str(folder)]
    assert not result["behaviour"]["present"] and result["lenses"] is None and result["agreement"] is None
    assert result["behaviour"]["gap"] <= 2 * result["behaviour"]["stderr"]
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "no induction behaviour" in page and "no previous-token or induction head is named" in page
    assert '<table class="summary">' not in page  # no lens table: nothing is named


def test_three_lenses_name_the_same_heads_on_attn2l_induction(induction_summary):
    """The agreement section: weights, activations and discovery name one previous-token and one induction head."""
    agree = induction_summary["agreement"]
    for role in ("previous_token_head", "induction_head"):
        named = agree[role]["named"]
        assert set(named) == {"weights", "activations", "discovery"}
        assert agree[role]["agree"], named
        assert len(set(named.values())) == 1 and None not in named.values()


def test_the_agreed_heads_are_the_cards_heads(induction_summary):
    """What the lenses agree on is what the card measured from attention patterns (an independent reading)."""
    card = model_card("attn2l-induction")
    prev = {f"L{layer}H{head}" for layer, head in card["previous_token_heads"]}
    ind = {f"L{layer}H{head}" for layer, head in card["induction_heads"]}
    named = induction_summary["agreement"]
    assert named["previous_token_head"]["named"]["weights"] in prev
    assert named["induction_head"]["named"]["weights"] in ind


def test_attention_patterns_confirm_the_agreed_heads(induction_summary):
    """The attention-pattern check (a forward pass, outside the three lenses) finds the same two heads."""
    check, named = induction_summary["attention_pattern_check"], induction_summary["agreement"]
    assert check["previous_token_head"] == named["previous_token_head"]["named"]["activations"]
    assert check["induction_head"] == named["induction_head"]["named"]["activations"]
    assert check["previous_token_score"] > 0.4 and check["induction_score"] > 0.4, check


def test_discovery_circuit_is_faithful(induction_summary):
    d = induction_summary["lenses"]["discovery"]
    assert d["acdc_faithfulness"] > 0.8, d["acdc_faithfulness"]
    assert d["acdc_edges"] > 0 and d["acdc_forwards"] > d["acdc_edges"]


def test_bigram_skiptrigram_recovers_the_planted_structure(tmp_path):
    summary = bigram_skiptrigram.main(["--out", str(tmp_path)])["models"]
    assert (tmp_path / "report.html").stat().st_size > 0
    bigram = summary["attn0l-bigram"]
    assert bigram["correlation_row_centred"] > 0.9
    skip = summary["attn1l-skiptrigram"]
    assert skip["recall"]["27"]["all_heads"] == 1.0, skip["recall"]


def test_analyses_reject_an_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="--model"):
        induction.main(["--model", "no-such-model", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="layers"):
        bigram_skiptrigram.main(["--model", "attn2l-induction", "--out", str(tmp_path)])


def test_backward_elimination_keeps_the_planted_circuit(planted):
    """On the planted induction model, removing edges one at a time while the metric holds leaves the four
    planted edges whose sources differ between clean and corrupted runs with the full model's metric."""
    from analyses.circuit_sizes import backward_elimination
    from circuits.tasks import induction_task

    found = backward_elimination(planted, induction_task(4, 6, 32, seed=0), smallest=4, progress=False)
    assert found[4] > 0.99
    assert min(found.values()) > 0.99
