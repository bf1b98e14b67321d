"""Weight-only analyses on the shipped zoo models against their model cards and planted data structure.

Each test skips (with the reason) while its checkpoint is not in the zoo.
"""

from __future__ import annotations

import pytest

from circuits.models.zoo import available, load_pretrained, model_card
from circuits.weights import classify_heads, composition_scores


def _require(name: str) -> None:
    if name not in available():
        pytest.skip(f"zoo checkpoint {name!r} not present (python -m circuits.models.zoo --name {name})")


def test_attn2l_induction_top_k_composition_runs_from_previous_token_to_induction_head():
    _require("attn2l-induction")
    model, card = load_pretrained("attn2l-induction"), model_card("attn2l-induction")
    prev = {tuple(h) for h in card["previous_token_heads"]}
    ind = {tuple(h) for h in card["induction_heads"]}
    assert prev and ind, "the card names no previous-token or induction head"
    for fold in (True, False):
        result = composition_scores(model, "K", fold_layernorm=fold)
        source, dest, _ = result.top_pairs(1)[0]
        assert source in {f"L{lay}H{h}" for lay, h in prev}, (fold, result.top_pairs(3))
        assert dest in {f"L{lay}H{h}" for lay, h in ind}, (fold, result.top_pairs(3))


def test_attn2l_induction_classification_finds_the_cards_heads():
    """Weight-only labels against the card's (activation-measured) heads: every labelled previous-token or
    induction head is one the card names, and at least one of each kind is found."""
    _require("attn2l-induction")
    model, card = load_pretrained("attn2l-induction"), model_card("attn2l-induction")
    result = classify_heads(model)
    prev = {tuple(h) for h in card["previous_token_heads"]}
    ind = {tuple(h) for h in card["induction_heads"]}
    found_prev, found_ind = set(result.heads("previous_token")), set(result.heads("induction"))
    assert found_prev and found_prev <= prev, (found_prev, prev, result.values)
    assert found_ind and found_ind <= ind, (found_ind, ind, result.values)
