"""A GPT-2-shaped `TransformerBridge` with random weights, built locally (no download).

For testing and benchmarking the hook-based methods on a real architecture with MLPs: the Hugging Face
`GPT2LMHeadModel` is initialised from a config and wrapped by `TransformerBridge.boot_transformers`, with a
word-level tokenizer ("w0" … "w{d_vocab-1}", BOS = "w0") built in memory.
"""

from __future__ import annotations

import torch
from transformer_lens import TransformerBridge


def random_gpt2(*, n_layers: int, d_model: int, n_heads: int, d_vocab: int, n_ctx: int, seed: int = 0
                ) -> TransformerBridge:
    """A GPT-2 bridge with random weights (eval mode, CPU).

    Example: `model = random_gpt2(n_layers=12, d_model=768, n_heads=12, d_vocab=1000, n_ctx=64)`
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if d_model % n_heads:
        raise ValueError(f"d_model: {d_model} is not a multiple of n_heads = {n_heads}")
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(d_vocab)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="w0", eos_token="w0", unk_token="w0",
                                  pad_token="w0")
    tok.init_kwargs["name_or_path"] = "local-random-gpt2"  # else get_tokenizer_with_bos looks on the hub
    tok.init_kwargs["add_bos_token"] = True
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=d_vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                                    n_head=n_heads)).eval()
    model = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok)
    model.eval()
    return model
