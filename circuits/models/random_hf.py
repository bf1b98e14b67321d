"""Small Hugging Face architectures with random weights as `TransformerBridge`s, built locally (no download).

One builder per architecture the engine runs (`circuits.engine.ARCHITECTURES`): `random_neox` (GPT-NeoX /
Pythia), `random_llama`, `random_qwen2`, `random_mistral`, `random_gemma`; `circuits.models.random_gpt2` is GPT-2. Each
initialises the `transformers` model from a config, perturbs every norm weight and bias away from its
initial 1 and 0 (so that tests see them), and wraps it with `TransformerBridge.boot_transformers` and a
word-level tokenizer ("w0" … "w{d_vocab-1}", BOS = "w0") built in memory.
"""

from __future__ import annotations

import torch
from transformer_lens import TransformerBridge


def local_tokenizer(d_vocab: int, name: str):
    """A word-level tokenizer over "w0" … "w{d_vocab-1}" (BOS, EOS, UNK and PAD "w0"), set up so that the bridge
    never looks on the model hub for it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(d_vocab)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="w0", eos_token="w0", unk_token="w0",
                                  pad_token="w0")
    tok.init_kwargs["name_or_path"] = name  # else get_tokenizer_with_bos looks on the hub
    tok.init_kwargs["add_bos_token"] = True
    return tok


def boot(hf_model, architecture: str, d_vocab: int, *, dtype: torch.dtype = torch.float32,
         perturb: bool = True, seed: int = 0) -> TransformerBridge:
    """Wrap a locally built Hugging Face causal LM as a bridge (eval mode, CPU, `dtype`); with `perturb`, norm
    weights and every bias get seeded random offsets first."""
    hf_model = hf_model.to(dtype).eval()
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in hf_model.parameters():
                if p.ndim == 1:  # norm weights and biases
                    p.add_((0.2 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    model = TransformerBridge.boot_transformers(architecture, hf_model=hf_model,
                                                tokenizer=local_tokenizer(d_vocab, f"local-random-{architecture}"))
    model.eval()
    return model


def _check(d_model: int, n_heads: int, n_kv_heads: int | None = None) -> None:
    if d_model % n_heads:
        raise ValueError(f"d_model: {d_model} is not a multiple of n_heads = {n_heads}")
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads: n_heads = {n_heads} is not a multiple of {n_kv_heads}")


def random_neox(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, d_vocab: int = 40, n_ctx: int = 24,
                d_mlp: int = 64, rotary_pct: float = 0.5, parallel: bool = True, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> TransformerBridge:
    """A GPT-NeoX (Pythia) bridge with random weights: parallel attention and MLP, partial rotary embeddings.
    Example: `model = random_neox(n_layers=2, d_model=32, n_heads=4)`"""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    _check(d_model, n_heads)
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=d_vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                        num_attention_heads=n_heads, max_position_embeddings=n_ctx, rotary_pct=rotary_pct,
                        use_parallel_residual=parallel, hidden_act="gelu")
    return boot(GPTNeoXForCausalLM(cfg), "gpt_neox", d_vocab, dtype=dtype, seed=seed)


def _llama_like(config_cls, model_cls, architecture: str, *, n_layers: int, d_model: int, n_heads: int,
                n_kv_heads: int, d_vocab: int, n_ctx: int, d_mlp: int, dtype: torch.dtype, seed: int, **extra
                ) -> TransformerBridge:
    _check(d_model, n_heads, n_kv_heads)
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=d_vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                     num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=n_ctx,
                     tie_word_embeddings=False, **extra)
    return boot(model_cls(cfg), architecture, d_vocab, dtype=dtype, seed=seed)


def random_llama(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2, d_vocab: int = 40,
                 n_ctx: int = 24, d_mlp: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0
                 ) -> TransformerBridge:
    """A LLaMA bridge with random weights: RMSNorm, rotary embeddings, grouped-query attention (`n_kv_heads`
    key/value heads), SwiGLU. Example: `model = random_llama(n_heads=4, n_kv_heads=2)`"""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _llama_like(LlamaConfig, LlamaForCausalLM, "llama", n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, d_vocab=d_vocab, n_ctx=n_ctx, d_mlp=d_mlp, dtype=dtype, seed=seed)


def random_qwen2(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2, d_vocab: int = 40,
                 n_ctx: int = 24, d_mlp: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0
                 ) -> TransformerBridge:
    """A Qwen2 bridge with random weights (LLaMA with q/k/v biases). Example: `model = random_qwen2()`"""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _llama_like(Qwen2Config, Qwen2ForCausalLM, "qwen2", n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, d_vocab=d_vocab, n_ctx=n_ctx, d_mlp=d_mlp, dtype=dtype, seed=seed,
                       use_sliding_window=False)


def random_mistral(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2,
                   d_vocab: int = 40, n_ctx: int = 24, d_mlp: int = 64, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> TransformerBridge:
    """A Mistral bridge with random weights (LLaMA-shaped; its sliding window covers the whole context).
    Example: `model = random_mistral()`"""
    from transformers import MistralConfig, MistralForCausalLM

    return _llama_like(MistralConfig, MistralForCausalLM, "mistral", n_layers=n_layers, d_model=d_model,
                       n_heads=n_heads, n_kv_heads=n_kv_heads, d_vocab=d_vocab, n_ctx=n_ctx, d_mlp=d_mlp, dtype=dtype,
                       seed=seed, sliding_window=n_ctx)


def random_gemma(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 1,
                 d_head: int | None = None, d_vocab: int = 40, n_ctx: int = 24, d_mlp: int = 64,
                 hidden_act: str = "gelu_pytorch_tanh", tie_embeddings: bool = True,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> TransformerBridge:
    """A Gemma (1) bridge with random weights: RMSNorm with (1 + w), rotary embeddings, multi-query attention
    (`n_kv_heads` 1, as gemma-2b; more for grouped-query), `d_head` free of d_model / n_heads (as gemma-7b's 256 for
    3072 / 16; d_model / n_heads when None), a GeGLU MLP (`hidden_act`), embeddings scaled by sqrt(d_model) and
    tied to the unembedding unless `tie_embeddings=False`. Example: `model = random_gemma(d_head=16)`"""
    from transformers import GemmaConfig, GemmaForCausalLM

    if d_head is None:
        _check(d_model, n_heads)
        d_head = d_model // n_heads
    if n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads: n_heads = {n_heads} is not a multiple of {n_kv_heads}")
    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=d_vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=d_head,
                      max_position_embeddings=n_ctx, hidden_act=hidden_act, tie_word_embeddings=tie_embeddings,
                      pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return boot(GemmaForCausalLM(cfg), "gemma", d_vocab, dtype=dtype, seed=seed)
