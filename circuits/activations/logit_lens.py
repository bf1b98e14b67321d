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

    def kl_to_final(self) -> LabelledResult:
        """KL(final ‖ stage) of each stage's next-token distribution, [stage, pos] (mean over the batch, nats).

        The final stage is the model's own distribution, so its row is 0. Computed with the project's one KL
        (`circuits.tasks.task.kl_terms`). Example: `logit_lens(model, tokens).kl_to_final().values.mean(-1)`
        """
        from circuits.tasks.task import kl_terms

        if self.logits is None:
            raise ValueError("result: has no logits to compare with the final stage")
        logits = self.logits[:, :, :-1]  # the positions of `values`: 0..pos-2
        final = logits[-1]
        kl = kl_terms(logits, final.expand_as(logits), final.log_softmax(-1)).mean(1)  # [stage, pos]
        return LabelledResult(values=kl, dims=("stage", "pos"), labels=self.labels,
                              method=f"{self.method}_kl_to_final", info={**self.info, "kl": "KL(final ‖ stage), nats"})


def residual_stages(model: TransformerBridge, tokens: Int[Tensor, "batch pos"]
                    ) -> tuple[Float[Tensor, "stage batch pos d_model"], tuple[str, ...]]:
    """The residual stream entering every block and leaving the last one (no gradients), and stage names."""
    L = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + ["ln_final.hook_in"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([cache[n] for n in names]), tuple(f"L{i} in" for i in range(L)) + ("final",)


def lens_result(model: TransformerBridge, tokens: Int[Tensor, "batch pos"],
                logits: Float[Tensor, "stage batch pos vocab"], stages: tuple[str, ...], method: str,
                info: dict) -> LensResult:
    """A `LensResult` from every stage's lens logits: the log-probability of the next token, and the argmax."""
    logprobs = logits.log_softmax(-1)
    nxt = tokens[:, 1:].to(logits.device)
    read = torch.gather(logprobs[:, :, :-1], -1, nxt.expand(len(stages), -1, -1)[..., None])[..., 0]
    labels = token_labels(model, tokens[0])[:-1]
    return LensResult(values=read.mean(1).cpu(), dims=("stage", "pos"), labels=(stages, labels), method=method,
                      info=info, top_tokens=logits.argmax(-1).cpu(), logits=logits.cpu())


def logit_lens(model: TransformerBridge, tokens: Int[Tensor, "batch pos"]) -> LensResult:
    """Apply ln_final (scale recomputed from each layer's residual stream) and the unembedding to the residual
    stream entering every block and leaving the last one.

    Example: `logit_lens(model, tokens).values[:, -1]` (how well each layer predicts the last token).
    """
    check_tokens(model, tokens, "tokens", min_pos=2)
    resid, stages = residual_stages(model, tokens)
    with torch.no_grad():
        logits = lens_logits(model, resid)
    return lens_result(model, tokens, logits, stages, "logit_lens", {"scale": "recomputed per stage"})


def lens_logits(model: TransformerBridge, resid: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead vocab"]:
    """ln_final with the scale recomputed from `resid` itself, then W_U and b_U."""
    return final_norm(model)(resid) @ model.W_U.detach() + model.b_U.detach()
