"""Activation patching's weights backend on every architecture the engine runs (rotary, grouped-query,
parallel, bidirectional), against the bridge's own hooks: the hooks backend for every site, per position or
not, in float32 and float64, and for LLaMA's shared keys and values one hooked forward per component written
independently of the library."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import perturb_norms_and_biases, scale_matrices
from transformer_lens import TransformerBridge
from transformer_lens.config import TransformerBridgeConfig

from circuits.activations import activation_patch, attribution_patch, valid_sites
from circuits.activations.engine import unsupported
from circuits.activations.sites import Site
from circuits.models import random_gemma, random_gpt2, random_llama, random_mistral, random_neox, random_qwen2
from circuits.tasks import induction_task

SHAPE = dict(n_layers=2, d_model=16, n_heads=4, d_vocab=24, n_ctx=20)


def _scaled(model: TransformerBridge, factor: float = 6.0) -> TransformerBridge:
    """Matrices `factor`× their initial scale, so that patches move the metric well above rounding."""
    return scale_matrices(model, factor)


def _native(**cfg) -> TransformerBridge:
    base = dict(n_layers=2, d_model=16, n_ctx=20, d_head=4, n_heads=4, d_vocab=24, attn_only=False, d_mlp=32,
                act_fn="gelu", normalization_type="LN", seed=0)
    torch.manual_seed(0)
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**{**base, **cfg}))
    perturb_norms_and_biases(model, 0)
    return model.eval()


BUILDERS = {
    "llama": lambda dt: _scaled(random_llama(**SHAPE, n_kv_heads=2, d_mlp=32, dtype=dt)),
    "qwen2": lambda dt: _scaled(random_qwen2(**SHAPE, n_kv_heads=1, d_mlp=32, dtype=dt)),
    "mistral": lambda dt: _scaled(random_mistral(**SHAPE, n_kv_heads=1, d_mlp=32, dtype=dt)),
    "neox": lambda dt: _scaled(random_neox(**SHAPE, d_mlp=32, dtype=dt)),
    "neox-sequential": lambda dt: _scaled(random_neox(**SHAPE, d_mlp=32, parallel=False, rotary_pct=1.0, dtype=dt)),
    "gpt2": lambda dt: _scaled(random_gpt2(**SHAPE, dtype=dt, perturb=True), 4.0),
    "gemma": lambda dt: _scaled(random_gemma(**SHAPE, n_kv_heads=1, d_head=8, d_mlp=32, dtype=dt)),
    "native-rms-rotary-gqa-swiglu": lambda dt: _native(normalization_type="RMS", positional_embedding_type="rotary",
                                                       n_key_value_heads=2, gated_mlp=True, act_fn="silu").to(dt),
    "native-lnpre-bidirectional": lambda dt: _native(normalization_type="LNPre", attention_dir="bidirectional").to(dt),
}
# the results are float32 whatever the model's dtype; in float64 the bridges of these models still compute a step
# in float32 (Hugging Face's LLaMA-family softmax, the RMS and LNPre norms)
FLOAT32_STEPS = {"llama", "qwen2", "mistral", "gemma", "native-rms-rotary-gqa-swiglu", "native-lnpre-bidirectional"}


@functools.cache
def model_of(name: str, dtype: torch.dtype) -> TransformerBridge:
    return BUILDERS[name](dtype)


def tolerance(name: str, dtype: torch.dtype, scale: float) -> float:
    """Float32 rounding of the metric (the results are float32), or of the float32 computations."""
    if dtype == torch.float32 or name in FLOAT32_STEPS:
        return 4e-6 * max(scale, 1.0)
    return 4e-7 * max(scale, 1.0)


@pytest.fixture(scope="module")
def task():
    return induction_task(3, 4, 20, seed=1)


# float64 on the rows whose code paths the others do not already cover
CASES = [(name, dt) for name in BUILDERS for dt in (torch.float32, torch.float64)
         if dt == torch.float32 or name not in ("qwen2", "mistral", "gpt2")]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_weights_backend_equals_the_hooks_for_every_site(name, dtype, task):
    model = model_of(name, dtype)
    assert unsupported(model) == []
    moved = 0.0
    for site in valid_sites(model):
        for per_position in (True, False) if dtype == torch.float32 else (True,):
            fast = activation_patch(model, task, site, per_position=per_position, progress=False, backend="weights")
            slow = activation_patch(model, task, site, per_position=per_position, progress=False, backend="hooks")
            assert fast.info["backend"] == "weights" and fast.raw.shape == slow.raw.shape
            scale = float(slow.raw.abs().max())
            err = float((fast.raw - slow.raw).abs().max())
            assert err <= tolerance(name, dtype, scale), (site, per_position, err)
            moved = max(moved, float((slow.raw - slow.corrupted_metric).abs().max()))
    assert moved > 0.02  # the patches move the metric well above rounding


def test_auto_chooses_the_weights_backend_on_every_engine_architecture(task):
    for name in BUILDERS:
        r = activation_patch(model_of(name, torch.float32), task, "resid_pre", per_position=False, progress=False)
        assert r.info["backend"] == "weights", name


def test_parallel_blocks_have_no_resid_mid(task):
    neox = model_of("neox", torch.float32)
    assert Site.RESID_MID not in valid_sites(neox)
    with pytest.raises(ValueError, match="parallel"):
        activation_patch(neox, task, "resid_mid", progress=False)


def _loop_oracle(model, task, site: str):
    """One hooked forward per (layer, head, position), denoising, each head index taken in the hook's own
    layout (key/value heads for k and v)."""
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(task.clean)
    L, P = model.cfg.n_layers, task.seq_len
    H = cache[f"blocks.0.attn.hook_{site}"].shape[2]
    out = torch.zeros(L, H, P)
    for layer in range(L):
        name = f"blocks.{layer}.attn.hook_{site}"
        for h in range(H):
            for p in range(P):
                def hook(act, hook, h=h, p=p, name=name):
                    act[:, p, h] = cache[name][:, p, h]
                    return act

                with torch.no_grad():
                    logits = model.run_with_hooks(task.corrupted, fwd_hooks=[(name, hook)])
                out[layer, h, p] = task.score(logits, clean_logits)
    return out


@pytest.mark.parametrize("site", ["q", "k", "v"])
def test_grouped_keys_and_values_equal_one_hooked_forward_per_component(task, site):
    """Under grouped-query attention a k or v component is a key/value head (its result axis has n_kv_heads
    entries), patched once for its whole group of query heads."""
    model = model_of("llama", torch.float64)
    ours = activation_patch(model, task, site, progress=False, backend="weights")
    ref = _loop_oracle(model, task, site)
    assert ours.raw.shape == ref.shape == (2, 4 if site == "q" else 2, task.seq_len)
    assert (ours.raw - ref).abs().max() <= tolerance("llama", torch.float64, float(ref.abs().max()))


@pytest.mark.parametrize("name", ["llama", "neox", "native-lnpre-bidirectional"])
@pytest.mark.parametrize("site", ["resid_pre", "z", "k", "pattern"])
def test_attribution_weights_backend_equals_its_hooks_backend(task, name, site):
    model = model_of(name, torch.float64)
    fast = attribution_patch(model, task, site, progress=False, backend="weights")
    slow = attribution_patch(model, task, site, progress=False, backend="hooks")
    scale = float(slow.raw.abs().max())
    assert (fast.raw - slow.raw).abs().max() <= tolerance(name, torch.float64, scale)
