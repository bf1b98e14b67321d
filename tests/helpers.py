"""Small helpers shared by test files (importable as `helpers`: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


def perturb_norms_and_biases(model, seed: int = 0) -> None:
    """Give LayerNorm weights/biases and every bias non-trivial values (init leaves them 1 and 0), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
