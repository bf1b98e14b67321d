"""Attention-pattern head scores (`circuits.models.head_scores`) against loops over the patterns."""

from __future__ import annotations

import pytest
import torch

from circuits.models.head_scores import (
    attention_by_offset,
    attention_patterns,
    induction_scores,
    previous_token_scores,
    unique_in_first_copy,
)
from circuits.tasks import repeated_random_tokens


def test_attention_patterns_are_the_bridges_own(tiny2):
    tokens = repeated_random_tokens(3, 6, 24, generator=torch.Generator().manual_seed(0))
    _, cache = tiny2.run_with_cache(tokens)
    patterns = attention_patterns(tiny2, tokens)
    for layer in range(2):
        assert torch.equal(patterns[layer], cache[f"blocks.{layer}.attn.hook_pattern"])


def _loop_scores(patterns, tokens, T):
    """Previous-token, induction (over k whose x_k is unique in x) and by-offset scores by explicit loops."""
    L, B, H, Q, _ = patterns.shape
    prev = torch.zeros(L, H, dtype=torch.float64)
    ind = torch.zeros(L, H, dtype=torch.float64)
    offset = torch.zeros(L, H, Q, dtype=torch.float64)
    n_ind = 0
    for b in range(B):
        x = tokens[b, 1:T + 1].tolist()
        for i in range(1, Q):
            prev += patterns[:, b, :, i, i - 1]
        for k in range(1, T):
            if x.count(x[k - 1]) == 1:
                ind += patterns[:, b, :, T + k, k + 1]
                n_ind += 1
        for q in range(T + 1, Q):
            for key in range(q + 1):
                offset[:, :, q - key] += patterns[:, b, :, q, key]
    return prev / (B * (Q - 1)), ind / n_ind, offset / (B * (Q - T - 1))


def test_scores_equal_loops_over_the_patterns_with_repeats_inside_x(tiny2):
    """Rows whose first copy repeats a token: the induction score skips those k; every score equals the loop."""
    T = 7
    tokens = repeated_random_tokens(4, T, 24, generator=torch.Generator().manual_seed(1))
    tokens[:, 3] = tokens[:, 5]  # x_3 = x_5 in the first copy, and so in the second
    tokens[:, T + 3] = tokens[:, T + 5]
    patterns = attention_patterns(tiny2, tokens).double()
    prev, ind, offset = _loop_scores(patterns, tokens, T)
    assert unique_in_first_copy(tokens, T)[:, [2, 4]].sum() == 0 and unique_in_first_copy(tokens, T).sum() == 4 * 5
    torch.testing.assert_close(previous_token_scores(tiny2, tokens).values.double(), prev, atol=1e-6, rtol=0)
    torch.testing.assert_close(induction_scores(tiny2, tokens, T).values.double(), ind, atol=1e-6, rtol=0)
    torch.testing.assert_close(attention_by_offset(tiny2, tokens, T).double(), offset, atol=1e-6, rtol=0)
    assert attention_by_offset(tiny2, tokens, T).sum(-1).sub(1).abs().max() < 1e-5  # each query's row sums to 1


def test_rows_that_are_not_repeats_are_refused(tiny2):
    tokens = repeated_random_tokens(2, 5, 24, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="2·half_len"):
        induction_scores(tiny2, tokens, 4)
    broken = tokens.clone()
    broken[:, -1] = (broken[:, -1] + 1) % 24
    with pytest.raises(ValueError, match="repeats the first"):
        attention_by_offset(tiny2, broken, 5)
    same = torch.zeros(2, 11, dtype=torch.long)
    with pytest.raises(ValueError, match="single earlier copy"):
        induction_scores(tiny2, same, 5)
