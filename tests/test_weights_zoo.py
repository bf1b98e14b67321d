"""Weight-only analyses on the shipped zoo models against their model cards and planted data structure.

Each test skips (with the reason) while its checkpoint is not in the zoo. The ground truth comes from the
card's data section (the generator's parameters), rebuilt with circuits.tasks. Measured figures are printed
and recorded as test properties (`record_property`), so `pytest -s` or the junit XML shows them.
"""

from __future__ import annotations

import pytest
import torch

from circuits.models.head_scores import previous_token_scores as measured_previous_token_scores
from circuits.models.zoo import available, load_pretrained, model_card
from circuits.tasks import markov_chain, skip_trigram_table
from circuits.weights import bigram_table, classify_heads, composition_scores, previous_token_scores, skip_trigrams


def _require(name: str) -> None:
    if name not in available():
        pytest.skip(f"zoo checkpoint {name!r} not present (python -m circuits.models.zoo --name {name})")


def _report(record_property, **figures) -> None:
    for key, value in figures.items():
        record_property(key, value)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


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


def test_attn2l_induction_weight_previous_token_score_matches_the_measured_attention(record_property):
    """The weight-only score (positional QK read through LayerNorm with the embeddings' σ, biases, average
    token) against the attention measured on uniform random tokens of length n_ctx: within 0.05 per head."""
    _require("attn2l-induction")
    model = load_pretrained("attn2l-induction")
    tokens = torch.randint(0, model.cfg.d_vocab, (64, model.cfg.n_ctx), generator=torch.Generator().manual_seed(0))
    measured = measured_previous_token_scores(model, tokens).values
    ours = previous_token_scores(model).values
    err = float((ours - measured).abs().max())
    _report(record_property, max_abs_difference=round(err, 4))
    assert err < 0.05, (ours, measured)


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


def _row_centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def test_attn0l_bigram_table_recovers_the_chain(record_property):
    """The direct path W_E W_U against the card's Markov chain: row-centred correlation with log P(next |
    current) (a row constant does not change a softmax), and recall of each state's `support` likely
    successors among the top `support` entries of its row (chance: support / n_states)."""
    _require("attn0l-bigram")
    model, data = load_pretrained("attn0l-bigram"), model_card("attn0l-bigram")["data"]
    chain = markov_chain(data["n_states"], support=data["support"], floor=data["floor"], seed=data["seed"])
    table = bigram_table(model).AB.double()
    truth = chain.log_transition().double()
    corr = float(torch.corrcoef(torch.stack([_row_centred(table).flatten(), _row_centred(truth).flatten()]))[0, 1])
    k = chain.support
    found, likely = table.topk(k, -1).indices, chain.transition.topk(k, -1).indices
    recall = float((found[:, :, None] == likely[:, None, :]).any(-1).double().mean())
    top1 = float((table.argmax(-1) == chain.likeliest_next()).double().mean())
    _report(record_property, correlation=round(corr, 4), successor_recall=round(recall, 4),
            likeliest_next_agreement=round(top1, 4), chance_recall=round(k / chain.n_states, 4))
    assert corr > 0.9
    assert recall > 0.9


def test_attn1l_skiptrigram_top_trigrams_include_the_planted_ones(record_property):
    """Recall of the card's planted (A, B, C) among the top skip-trigrams of its trained heads (those the card
    measures attending from B to A). A head that attends from any B to any A and raises A's completions has
    n_a · n_b · n_b candidates (A, B, C(A, B')) of equal standing, so each head's top n_a · n_b · n_b are read."""
    _require("attn1l-skiptrigram")
    model, card = load_pretrained("attn1l-skiptrigram"), model_card("attn1l-skiptrigram")
    data = card["data"]
    table = skip_trigram_table(data["n_a"], data["n_b"], data["d_vocab"])
    heads = [h for _, h, _ in card["skip_trigram_heads"]]
    assert heads, "the card names no skip-trigram head"
    k = data["n_a"] * data["n_b"] * data["n_b"]
    found = {t[:3] for h in heads for t in skip_trigrams(model, 0, h, k=k).as_tuples()}
    planted = set(table.triples)
    recall = len(found & planted) / len(planted)
    per_head = {f"L0H{h}": len({t[:3] for t in skip_trigrams(model, 0, h, k=k).as_tuples()} & planted)
                / len(planted) for h in heads}
    _report(record_property, recall=round(recall, 4), k=k, heads=str(per_head))
    assert recall >= 0.75, (recall, per_head)
