"""Full QK/OV circuits and the bigram table against brute-force products and the model's own forward pass."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb_norms_and_biases

from circuits.models import attn_only
from circuits.weights import attention_scale, bigram_table, full_ov_circuit, full_qk_circuit


@pytest.fixture(scope="module")
def ln_model():
    model = attn_only(2, 24, 3, 8, d_vocab=20, n_ctx=12, seed=5)
    perturb_norms_and_biases(model)
    return model


def _centre(W):
    return W - W.mean(-2, keepdim=True)


def test_full_ov_equals_brute_force_product(ln_model):
    m = ln_model
    W_E, W_V, W_O, W_U = m.W_E.detach(), m.W_V.detach(), m.W_O.detach(), m.W_U.detach()
    raw = full_ov_circuit(m, 1, 2, fold_layernorm=False)
    assert raw.A.shape[-1] == m.cfg.d_head  # factored, never d_vocab × d_vocab
    torch.testing.assert_close(raw.AB, W_E @ W_V[1, 2] @ W_O[1, 2] @ W_U, rtol=1e-5, atol=1e-6)
    w1, wf = m.blocks[1].ln1.w.detach(), m.ln_final.w.detach()
    folded = W_E @ _centre(w1[:, None] * W_V[1, 2]) @ W_O[1, 2] @ _centre(wf[:, None] * W_U)
    torch.testing.assert_close(full_ov_circuit(m, 1, 2).AB, folded, rtol=1e-5, atol=1e-6)


def test_full_qk_terms_sum_to_the_attention_scores():
    """No LayerNorm, zero biases: the four token/position terms add up to the scores behind hook_pattern.

    (The bridge's `hook_attn_scores` holds the pattern after softmax, so the oracle is the pattern.)"""
    m = attn_only(1, 24, 3, 8, d_vocab=20, n_ctx=12, layernorm=False, seed=6)
    tokens = torch.randint(0, 20, (2, 12))
    _, cache = m.run_with_cache(tokens)
    pattern = cache["blocks.0.attn.hook_pattern"][:, 1]  # [batch, q, k]
    pos = torch.arange(12)
    sides = ("token", "position")
    terms = {(q, k): full_qk_circuit(m, 0, 1, query=q, key=k).AB for q in sides for k in sides}
    for b in range(2):
        t = tokens[b]
        total = (terms["token", "token"][t][:, t] + terms["token", "position"][t][:, pos]
                 + terms["position", "token"][pos][:, t] + terms["position", "position"])
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        ours = total.masked_fill(~causal, -torch.inf).softmax(-1)
        torch.testing.assert_close(ours, pattern[b], rtol=1e-5, atol=1e-6)


def test_full_qk_brute_force_with_layernorm_folded(ln_model):
    m = ln_model
    w = m.blocks[0].ln1.w.detach()
    Q, K = _centre(w[:, None] * m.W_Q.detach()[0, 1]), _centre(w[:, None] * m.W_K.detach()[0, 1])
    expected = m.W_pos.detach() @ Q @ K.T @ m.W_E.detach().T / attention_scale(m)
    torch.testing.assert_close(full_qk_circuit(m, 0, 1, query="position", key="token").AB, expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layernorm", [True, False])
def test_bigram_table_is_the_zero_layer_model(layernorm):
    m = attn_only(0, 16, 2, 8, d_vocab=20, n_ctx=10, layernorm=layernorm, seed=7)
    perturb_norms_and_biases(m)
    tokens = torch.randint(0, 20, (3, 10))
    logits = m(tokens)
    for p in (0, 4, 9):
        table = bigram_table(m, position=p)
        assert table.mdim == m.cfg.d_model + 1
        torch.testing.assert_close(table.AB[tokens[:, p]], logits[:, p], rtol=1e-5, atol=1e-5)


def test_bad_layer_head_and_sides(ln_model):
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\)"):
        full_ov_circuit(ln_model, 2, 0)
    with pytest.raises(ValueError, match=r"head must be an integer in \[0, 3\)"):
        full_qk_circuit(ln_model, 0, -1)
    with pytest.raises(ValueError, match=r"query must be one of \['token', 'position'\]"):
        full_qk_circuit(ln_model, 0, 0, query="pos")
    with pytest.raises(ValueError, match="position must be None or an integer"):
        bigram_table(ln_model, position=12)
    zero = attn_only(0, 16, 2, 8, d_vocab=20, n_ctx=10)
    with pytest.raises(ValueError, match="no attention layers"):
        full_ov_circuit(zero, 0, 0)
