"""Shared fixtures: tiny seeded models and the planted model. Nothing here downloads anything."""

from __future__ import annotations

import pytest
import torch

from circuits.models import attn_only, planted_induction


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def planted():
    """The hand-built induction model; `planted.planted` names its heads."""
    return planted_induction()


@pytest.fixture(scope="session")
def tiny2():
    """A random 2-layer, 4-head attention-only model with LayerNorm."""
    return attn_only(2, 32, 4, 8, d_vocab=24, n_ctx=20, seed=1)


@pytest.fixture(scope="session")
def tiny2_noln():
    """A random 2-layer, 4-head attention-only model without LayerNorm."""
    return attn_only(2, 32, 4, 8, d_vocab=24, n_ctx=20, layernorm=False, seed=2)
