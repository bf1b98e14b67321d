"""A GPT-2-shaped `TransformerBridge` with random weights, built locally (no download).

For testing and benchmarking the hook-based methods on a real architecture with MLPs: the Hugging Face
`GPT2LMHeadModel` is initialised from a config and wrapped by `TransformerBridge.boot_transformers`, with a
word-level tokenizer ("w0" … "w{d_vocab-1}", BOS = "w0") built in memory. The other architectures' builders
are in `circuits.models.random_hf`.
"""

from __future__ import annotations

import torch
from transformer_lens import TransformerBridge

from circuits.models.random_hf import boot


def random_gpt2(*, n_layers: int, d_model: int, n_heads: int, d_vocab: int, n_ctx: int, seed: int = 0,
                dtype: torch.dtype = torch.float32, perturb: bool = False) -> TransformerBridge:
    """A GPT-2 bridge with random weights (eval mode, CPU); `perturb` moves norm weights and biases off their
    initial 1 and 0 (see `circuits.models.random_hf.boot`).

    Example: `model = random_gpt2(n_layers=12, d_model=768, n_heads=12, d_vocab=1000, n_ctx=64)`
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if d_model % n_heads:
        raise ValueError(f"d_model: {d_model} is not a multiple of n_heads = {n_heads}")
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=d_vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                                    n_head=n_heads))
    return boot(hf, "gpt2", d_vocab, dtype=dtype, perturb=perturb, seed=seed)
