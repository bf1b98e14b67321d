"""Training a bridge on the CPU, deterministically for a seed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerBridge

from circuits.validate import check_count, check_number, check_tokens

Batch = Int[Tensor, "batch pos"] | tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]
DataSource = Tensor | Callable[[int, torch.Generator], Batch]  # a [n, pos] token tensor, checked in _sample


@dataclass
class TrainLog:
    """What training did: the loss of every step (nats per predicted token) and the settings."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    lr: float = 0.0
    batch_size: int = 0
    seed: int = 0

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 5% of steps (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 20):]
        return sum(tail) / len(tail)


def next_token_loss(
    logits: Tensor, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"] | None = None
) -> Tensor:
    """Mean cross-entropy of predicting `tokens[:, 1:]` from `logits[:, :-1]`.

    `mask[b, p]` says whether token p (p ≥ 1) is counted as a target. Example: `next_token_loss(model(t), t)`
    """
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    if mask is None:
        return losses.mean()
    weights = mask[:, 1:].flatten().to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def _sample(model: TransformerBridge, data: DataSource, batch_size: int, gen: torch.Generator
            ) -> tuple[Tensor, Tensor | None]:
    if isinstance(data, Tensor):
        rows = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        return data[rows], None
    batch = data(batch_size, gen)
    tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
    check_tokens(model, tokens, "data (the batch it returned)", min_pos=2)
    return tokens, mask


def train(
    model: TransformerBridge,
    data: DataSource,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    progress: bool = True,
) -> TrainLog:
    """Train `model` in place with AdamW (linear warm-up, cosine decay) on next-token prediction.

    `data` is either a [n, pos] token tensor (rows sampled with replacement) or a callable
    `(batch_size, generator) -> tokens` or `-> (tokens, loss_mask)`. Deterministic for a seed on one
    machine: the same seed gives bit-identical weights. Example: `log = train(m, tokens, steps=500)`
    """
    check_count(steps, "steps", minimum=1)
    check_count(batch_size, "batch_size", minimum=1)
    check_number(lr, "lr", positive=True)
    check_number(weight_decay, "weight_decay", minimum=0)
    if isinstance(data, Tensor):
        check_tokens(model, data, "data", min_pos=2)
    elif not callable(data):
        raise ValueError(f"data: expected a [n, pos] token tensor or a callable, got {type(data).__name__}")
    warmup = max(1, steps // 20) if warmup is None else check_count(warmup, "warmup", minimum=1)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, steps))
    log = TrainLog(steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    model.train()
    bar = tqdm(range(steps), disable=not progress, desc="train", leave=False)
    try:
        for _ in bar:
            tokens, mask = _sample(model, data, batch_size, gen)
            loss = next_token_loss(model(tokens), tokens, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            log.losses.append(loss.item())
            if progress:
                bar.set_postfix(loss=f"{log.losses[-1]:.4f}", refresh=False)
    finally:
        model.eval()
        opt.zero_grad(set_to_none=True)
    return log


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
