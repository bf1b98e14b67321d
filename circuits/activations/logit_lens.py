"""The logit lens: what the residual stream predicts after each layer, read through ln_final and W_U."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import TransformerBridge

from circuits.activations.sites import token_labels
from circuits.engine import final_norm
from circuits.results import LabelledResult
from circuits.validate import check_tokens


@dataclass(frozen=True, eq=False)
class LensResult(LabelledResult):
    """`values` [stage, pos]: the lens log-probability of the next input token (mean over the batch) for
    positions 0..pos-2. Stage i < n_layers reads resid_pre of block i (stage 0: the embeddings); the last
    stage reads the final residual stream (it equals the model's own prediction). `top_tokens`
    [stage, batch, pos] is the lens's argmax at every position; `logits` [stage, batch, pos, vocab]."""

    top_tokens: Tensor | None = None
    logits: Tensor | None = None


def logit_lens(model: TransformerBridge, tokens: Int[Tensor, "batch pos"]) -> LensResult:
    """Apply ln_final (scale recomputed from each layer's residual stream) and the unembedding to the residual
    stream entering every block and leaving the last one.

    Example: `logit_lens(model, tokens).values[:, -1]` (how well each layer predicts the last token).
    """
    check_tokens(model, tokens, "tokens", min_pos=2)
    L = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + ["ln_final.hook_in"]
    if L == 0:
        names = ["ln_final.hook_in"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        resid = torch.stack([cache[n] for n in names])  # stage batch pos d_model
        logits = lens_logits(model, resid)
    logprobs = logits.log_softmax(-1)
    nxt = tokens[:, 1:].to(logits.device)
    read = torch.gather(logprobs[:, :, :-1], -1, nxt.expand(len(names), -1, -1)[..., None])[..., 0]
    stages = tuple(f"L{i} in" for i in range(L)) + ("final",)
    labels = token_labels(model, tokens[0])[:-1]
    return LensResult(values=read.mean(1).cpu(), dims=("stage", "pos"), labels=(stages, labels),
                      method="logit_lens", info={"scale": "recomputed per stage"},
                      top_tokens=logits.argmax(-1).cpu(), logits=logits.cpu())


def lens_logits(model: TransformerBridge, resid: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead vocab"]:
    """ln_final with the scale recomputed from `resid` itself, then W_U and b_U."""
    return final_norm(model)(resid) @ model.W_U.detach() + model.b_U.detach()
