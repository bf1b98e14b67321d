"""Path expansion: the terms sum to the logits exactly; single terms equal the heads' cached outputs; bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb_norms_and_biases
from jaxtyping import TypeCheckError

from circuits.models import ModelSpec, attn_only, build
from circuits.weights import path_expansion


def _rel_err(a, b) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("n_layers", [0, 1, 2])
@pytest.mark.parametrize("layernorm", [False, True])
def test_terms_sum_to_logits(n_layers, layernorm):
    """Exact identity given the cached patterns and LN scales: 1e-5 of max |logit| (float32), LN or not."""
    model = attn_only(n_layers, 32, 4, 8, d_vocab=24, n_ctx=16, layernorm=layernorm, seed=3)
    perturb_norms_and_biases(model)
    tokens = torch.randint(0, 24, (3, 16))
    pe = path_expansion(model, tokens)
    H = 4
    expected_terms = 2 + (H if n_layers >= 1 else 0) + (H + H * H if n_layers == 2 else 0)
    assert pe.values.shape == (expected_terms, 3, 16, 24)
    assert _rel_err(pe.logits, model(tokens)) < 1e-5


def test_single_and_virtual_heads_match_cached_head_outputs(tiny2_noln):
    """No LN, zero biases: a layer-0 head's term is its cached output read by W_U; a layer-1 head's direct term
    plus its virtual-head terms is its cached output read by W_U."""
    m = tiny2_noln
    tokens = torch.randint(0, 24, (2, 12))
    pe = path_expansion(m, tokens)
    _, cache = m.run_with_cache(tokens)
    W_O, W_U = m.W_O.detach(), m.W_U.detach()
    for layer in (0, 1):
        z = cache[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, head, d_head]
        for h in range(4):
            head_logits = z[:, :, h] @ W_O[layer, h] @ W_U
            if layer == 0:
                ours = pe.term(f"L0H{h}")
            else:
                ours = pe.term(f"L1H{h}") + sum(pe.term(f"L0H{a}>L1H{h}") for a in range(4))
            assert _rel_err(ours, head_logits) < 1e-5
    direct = (m.W_E.detach()[tokens] + m.W_pos.detach()[:12]) @ W_U
    assert _rel_err(pe.term("direct"), direct) < 1e-6
    assert pe.term("bias").abs().max() == 0  # all biases are zero in this model


def test_model_left_unchanged(tiny2):
    before = {k: v.clone() for k, v in tiny2.state_dict().items()}
    path_expansion(tiny2, torch.randint(0, 24, (1, 8)))
    after = tiny2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not hp._forward_hooks for hp in tiny2.hook_dict.values())


def test_bad_input(tiny2):
    mlp = build(ModelSpec(1, 16, 2, 8, 20, 10, d_mlp=32, act_fn="gelu"))
    with pytest.raises(ValueError, match=r"model: path_expansion is defined for attention-only models.*MLP"):
        path_expansion(mlp, torch.zeros(1, 4, dtype=torch.long))
    deep = attn_only(3, 16, 2, 8, d_vocab=20, n_ctx=10)
    with pytest.raises(ValueError, match=r"n_layers in \[0, 1, 2\].*n_layers=3"):
        path_expansion(deep, torch.zeros(1, 4, dtype=torch.long))
    # under --jaxtyping-packages the annotation rejects it first (TypeCheckError also names `tokens`)
    with pytest.raises((ValueError, TypeCheckError), match="tokens"):
        path_expansion(tiny2, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens: .* exceed the model.s context n_ctx = 20"):
        path_expansion(tiny2, torch.zeros(1, 21, dtype=torch.long))
    pe = path_expansion(tiny2, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="name must be one of"):
        pe.term("L2H0")
