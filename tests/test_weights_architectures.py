"""Weight-only analyses on the LLaMA family (grouped-query attention, RMSNorm, rotary) and Gemma (RMSNorm with
1 + w, embeddings scaled by √d_model), checked against the Hugging Face modules and the bridge's own hooks,
not against our weight reader; and the query-key analyses refused under rotary position embeddings.

The models are float64, but the Hugging Face RMSNorms compute in float32 whatever the dtype, so comparisons
that pass through one of them hold to float32 rounding (RTOL)."""

from __future__ import annotations

import re

import pytest
import torch

from circuits.models import random_gemma, random_llama
from circuits.weights import (
    all_composition_scores,
    bigram_table,
    classify_heads,
    composition_scores,
    copying_scores,
    full_ov_circuit,
    full_qk_circuit,
    induction_scores,
    positional_attention,
    skip_trigrams,
)

BUILDERS = {
    "llama-gqa": lambda: random_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=40, n_ctx=24,
                                      d_mlp=64, dtype=torch.float64),
    "gemma-gqa": lambda: random_gemma(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, dtype=torch.float64),
}


RTOL = 1e-6  # about 8 float32 ulps


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    return BUILDERS[request.param]()


def _original(module):
    """The Hugging Face module a bridge component wraps (the module itself where it is not wrapped)."""
    return getattr(module, "_original_component", module)


def _hf_heads(model, layer: int):
    """W_V per key/value head [kv_head, d_model, d_head] and W_O per head [head, d_head, d_model], read from the
    Hugging Face projections, and ln1's weight as the model multiplies by it."""
    attn = model.original_model.model.layers[layer].self_attn
    d_head = model.cfg.d_head
    W_V = _original(attn.v_proj).weight.detach().T.unflatten(1, (-1, d_head)).permute(1, 0, 2)
    W_O = _original(attn.o_proj).weight.detach().T.unflatten(0, (-1, d_head))
    norm = _original(model.original_model.model.layers[layer].input_layernorm)
    ones = torch.ones(W_V.shape[1], dtype=W_V.dtype)
    with torch.no_grad():
        gain = norm(ones) * (1 + _eps(norm)) ** 0.5  # norm(x) = gain ⊙ x / rms(x), and rms(1) = √(1 + eps)
    return W_V, W_O, gain


def _eps(norm) -> float:
    return getattr(norm, "eps", None) or norm.variance_epsilon  # Gemma's name, LLaMA's


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding of the largest entry (the Hugging Face norms' precision)."""
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(expected.abs().max()))


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def test_ov_circuit_reads_each_heads_key_value_head_and_the_models_own_norm_and_embedding(model):
    """A[t] of the folded OV circuit of a layer-0 head is rms(x) · v, with x the residual stream the bridge
    builds for token t (scaled embedding) and v the value its hook records for that head's key/value head."""
    tokens = torch.arange(model.cfg.d_vocab)[None]
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre", "blocks.0.attn.hook_v"])
    x, v = cache["blocks.0.hook_resid_pre"][0], cache["blocks.0.attn.hook_v"][0]  # [vocab, d], [vocab, kv, e]
    eps = _eps(_original(model.original_model.model.layers[0].input_layernorm))
    group = model.cfg.n_heads // v.shape[1]
    for h in range(model.cfg.n_heads):
        A = full_ov_circuit(model, 0, h).A
        _assert_close(A, _rms(x, eps) * v[:, h // group])


def test_ov_circuit_unembeds_through_the_final_norm_as_the_model_does(model):
    """B of the folded OV circuit is W_O[h] through the final norm's weight and W_U: for each row y,
    rms(y) · lm_head(norm(y)) with the Hugging Face modules."""
    hf = model.original_model
    norm, head = _original(hf.model.norm), _original(hf.lm_head)
    _, W_O, _ = _hf_heads(model, 1)
    W_O = W_O.detach()
    for h in range(model.cfg.n_heads):
        B = full_ov_circuit(model, 1, h).B
        y = W_O[h]
        with torch.no_grad():
            _assert_close(B, _rms(y, _eps(norm)) * head(norm(y)))


def test_v_composition_pairs_each_head_with_its_key_value_head(model):
    """V-composition of a layer-0 head into a layer-1 head, by its definition on matrices read from the Hugging
    Face projections: ‖W_OV(a) · W_OV(b)‖_F / (‖W_OV(a)‖_F ‖W_OV(b)‖_F), each W_V with its ln1 weight folded."""
    scores = composition_scores(model, "V").scores
    ov = []
    for layer in range(2):
        W_V, W_O, gain = _hf_heads(model, layer)
        group = W_O.shape[0] // W_V.shape[0]
        ov.append([gain[:, None] * W_V[h // group] @ W_O[h] for h in range(W_O.shape[0])])
    for a, A in enumerate(ov[0]):
        for b, B in enumerate(ov[1]):
            expected = torch.linalg.matrix_norm(A @ B) / (torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B))
            assert float(scores[0, a, 1, b]) == pytest.approx(float(expected), rel=RTOL)


def test_bigram_table_is_the_final_norm_and_unembedding_of_each_scaled_embedding(model):
    """Row t is lm_head(norm(x_t)) with x_t the residual stream the bridge builds for token t."""
    tokens = torch.arange(model.cfg.d_vocab)[None]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre"])
    hf = model.original_model
    with torch.no_grad():
        expected = _original(hf.lm_head)(_original(hf.model.norm)(cache["blocks.0.hook_resid_pre"][0]))
    _assert_close(bigram_table(model).AB, expected)


def test_copying_scores_run_on_the_ov_side(model):
    scores = copying_scores(model).values
    assert scores.shape == (2, model.cfg.n_heads) and bool(((scores >= -1) & (scores <= 1)).all())


REFUSED = {  # what reads the query-key side or W_pos, and the name its refusal gives
    "full_qk_circuit": lambda m: full_qk_circuit(m, 0, 1),
    'composition_scores(kind="K")': lambda m: composition_scores(m, "K"),
    'composition_scores(kind="Q")': lambda m: composition_scores(m, "Q"),
    "all_composition_scores": all_composition_scores,
    "positional_attention": lambda m: positional_attention(m, 0, 0),
    "skip_trigram_scores": lambda m: skip_trigrams(m, 0, 0),
    "bigram_table(position=...)": lambda m: bigram_table(m, position=1),
    "classify_heads": classify_heads,
    "induction_scores": induction_scores,
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_query_key_readings_are_refused_under_rotary_positions(model, name):
    with pytest.raises(ValueError, match=re.escape(f"model: {name}") + ".*rotary position embeddings"):
        REFUSED[name](model)
