"""The engine on every supported architecture, small random models in float32 and float64, against the bridge:
its logits equal the bridge's; removing every edge out of a head (an MLP) equals patching that head's hook_z
(hook_mlp_out) with the corrupted run's through the bridge's hooks; removing every edge into a head's q (a key/value
head's k or v) equals patching that q (k, v) with the corrupted run's; EAP's scores of edges into the logits, an
MLP, a head's q and a key/value head's k and v equal autograd through the bridge's hooks; exact ACDC equals the
one-forward-per-edge reference; the full graph's faithfulness is 1, the empty's 0."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb_norms_and_biases, reference_acdc, scale_matrices
from transformer_lens import TransformerBridge
from transformer_lens.config import TransformerBridgeConfig

from circuits.engine import Weights, unsupported
from circuits.graph import Circuit, ComputeGraph, acdc, eap, faithfulness
from circuits.graph.metric import resolve_metric
from circuits.graph.patching import EdgePatcher
from circuits.models import random_gemma, random_gpt2, random_llama, random_mistral, random_neox, random_qwen2
from circuits.tasks import induction_task

SHAPE = dict(n_layers=2, d_model=16, n_heads=4, d_vocab=24, n_ctx=20)


def native(seed: int = 0, **cfg) -> TransformerBridge:
    """A native bridge of SHAPE with MLPs, its norm weights and biases perturbed."""
    base = dict(n_layers=2, d_model=16, n_ctx=20, d_head=4, n_heads=4, d_vocab=24, attn_only=False, d_mlp=32,
                act_fn="gelu", normalization_type="LN", seed=seed)
    torch.manual_seed(seed)
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**{**base, **cfg}))
    perturb_norms_and_biases(model, seed)
    return model.eval()


def scaled(model: TransformerBridge) -> TransformerBridge:
    """The model with its matrices 8× their initial scale (GPT-2's and GPT-NeoX's std 0.02 leaves attention
    nearly uniform and some removals' effects near rounding)."""
    return scale_matrices(model, 8)


BUILDERS = {
    "gpt2": lambda dt: scaled(random_gpt2(**SHAPE, dtype=dt, perturb=True)),
    "neox": lambda dt: scaled(random_neox(**SHAPE, d_mlp=32, dtype=dt)),
    "neox-sequential": lambda dt: scaled(random_neox(**SHAPE, d_mlp=32, parallel=False, rotary_pct=1.0, dtype=dt)),
    "llama": lambda dt: random_llama(**SHAPE, n_kv_heads=2, d_mlp=32, dtype=dt),
    "qwen2": lambda dt: scaled(random_qwen2(**SHAPE, n_kv_heads=2, d_mlp=32, dtype=dt)),
    "mistral": lambda dt: random_mistral(**SHAPE, n_kv_heads=1, d_mlp=32, dtype=dt),
    # multi-query attention and d_head 8 ≠ d_model / n_heads, as gemma-2b's one key/value head and gemma-7b's heads
    "gemma": lambda dt: scaled(random_gemma(**SHAPE, n_kv_heads=1, d_head=8, d_mlp=32, dtype=dt)),
    "native-rms-rotary-gqa-swiglu": lambda dt: native(normalization_type="RMS", positional_embedding_type="rotary",
                                                      n_key_value_heads=2, gated_mlp=True, act_fn="silu").to(dt),
    "native-lnpre-bidirectional": lambda dt: native(normalization_type="LNPre", attention_dir="bidirectional").to(dt),
    "native-nonorm-attn-only": lambda dt: native(normalization_type=None, attn_only=True).to(dt),
}
# float64 models whose bridge computes a step in float32 whatever the dtype (softmax in Hugging Face's LLaMA-family
# attention, the RMS and LNPre norms): the engine matches them to float32 rounding, the others to float64's
FLOAT32_STEPS = {"llama", "qwen2", "mistral", "gemma", "native-rms-rotary-gqa-swiglu", "native-lnpre-bidirectional"}
_MODELS: dict = {}


def model_of(name: str, dtype: torch.dtype) -> TransformerBridge:
    if (name, dtype) not in _MODELS:
        _MODELS[name, dtype] = BUILDERS[name](dtype)
    return _MODELS[name, dtype]


def tolerance(name: str, dtype: torch.dtype) -> float:
    if dtype == torch.float32 or name in FLOAT32_STEPS:
        return 2e-5
    return 1e-10


@pytest.fixture(scope="module")
def task():
    return induction_task(3, 6, 24, seed=1)


CASES = [(name, dt) for name in BUILDERS for dt in (torch.float32, torch.float64)]
IDS = [f"{n}-{str(d)[6:]}" for n, d in CASES]


def hooked(model, task, name, head=None):
    """The logits at the metric positions with hook `name` (at `head` on the head axis) given the corrupted run's
    value, through the bridge's own hooks."""
    with torch.no_grad():
        _, corrupted = model.run_with_cache(task.corrupted, names_filter=[name])

    def hook(x, hook):
        x = x.clone()
        if head is None:
            x[:] = corrupted[name]
        else:
            x[:, :, head] = corrupted[name][:, :, head]
        return x

    with torch.no_grad():
        return model.run_with_hooks(task.clean, fwd_hooks=[(name, hook)])[:, task.positions]


@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_logits_and_removals_equal_the_bridges_hooks(name, dtype, task):
    model = model_of(name, dtype)
    assert unsupported(model) == []
    p = EdgePatcher(model, task)
    tol = tolerance(name, dtype)
    with torch.no_grad():
        ref = model(task.clean)
    scale = float(ref.abs().max())
    assert (p.clean_logits_full - ref).abs().max() <= tol * scale
    g = p.graph
    kv = g.kv_heads
    cases = [("L1H2", "blocks.1.attn.hook_z", 2, "source"), ("L0H1", "blocks.0.attn.hook_z", 1, "source"),
             ("L1H3.q", "blocks.1.attn.hook_q", 3, "destination")]
    for qkv in "kv":
        group = kv - 1
        dst = f"L1G{group}.{qkv}" if g.group_size > 1 else f"L1H{group}.{qkv}"
        cases.append((dst, f"blocks.1.attn.hook_{qkv}", group, "destination"))
    if g.has_mlp:
        cases += [("MLP0", "blocks.0.hook_mlp_out", None, "source"), ("MLP1", "blocks.1.hook_mlp_out", None, "source")]
    for node, hook_name, head, side in cases:
        mask = g.valid.clone()
        if side == "source":
            mask[g.source_names.index(node), :] = False
        else:
            mask[:, g.destination_names.index(node)] = False
        ours = p.run(mask[None])[0]
        oracle = hooked(model, task, hook_name, head)
        error = float((ours - oracle).abs().max())
        assert error <= tol * scale, node
        assert float((ours - p.clean_logits).abs().max()) > 50 * error, node  # the agreement is not vacuous


def _metric_gradient(model, task, gm, eps, fwd_hooks) -> list[float]:
    logits = model.run_with_hooks(task.clean, fwd_hooks=fwd_hooks)[:, task.positions]
    (grad,) = torch.autograd.grad(gm.fn(logits[None])[0], eps)
    return grad.tolist()


def shifted_input_derivatives(model, task, gm, at: str, directions) -> list[float]:
    """d metric / dε at ε = 0 when the bridge's run adds ε · direction at hook `at`, for each of the n
    `directions` ([n, batch, pos, d_model]; one run: the shift Σ ε_i · direction_i is linear in ε)."""
    eps = torch.zeros(len(directions), dtype=directions.dtype, requires_grad=True)
    return _metric_gradient(model, task, gm, eps, [(at, lambda x, hook: x + torch.tensordot(eps, directions, 1))])


def one_head_input_derivatives(model, task, gm, layer: int, which: str, head: int, directions) -> list[float]:
    """d metric / dε at ε = 0 when only one head's `which` (q; or k or v of a key/value head) reads the residual
    stream plus ε · direction, for each of the n `directions`: a run of the bridge with the shift added at
    hook_resid_pre gives that head's hook_{which} as a function of ε (through the bridge's own norm and
    projection), and a clean run takes it for that head alone; autograd through both."""
    eps = torch.zeros(len(directions), dtype=directions.dtype, requires_grad=True)
    name = f"blocks.{layer}.attn.hook_{which}"
    kept = {}

    def keep(x, hook):
        kept["head"] = x[:, :, head]
        return x

    def put(x, hook):
        x = x.clone()
        x[:, :, head] = kept["head"]
        return x

    shift = (f"blocks.{layer}.hook_resid_pre", lambda x, hook: x + torch.tensordot(eps, directions, 1))
    model.run_with_hooks(task.clean, fwd_hooks=[shift, (name, keep)])
    return _metric_gradient(model, task, gm, eps, [(name, put)])


@pytest.mark.parametrize("name,dtype", CASES, ids=IDS)
def test_eap_equals_autograd_through_the_bridges_hooks(name, dtype, task):
    """EAP's score of s → d is the derivative at ε = 0 of the metric when the bridge's run adds ε·(ablated − clean
    output of s) to d's input: the final norm's input for the logits, the MLP's norm input for an MLP, and for a
    head's q (a key/value head's k, v) the residual stream that only this head's q (k, v) reads, through the
    bridge's norm and projection (`one_head_input_derivatives`). Every source of each destination is checked,
    to a tolerance relative to the destination's largest score: float32 rounding (1e-4: the scores are sums of
    about a thousand products that partly cancel), or for float64 models computed wholly in float64 the float32
    the scores are returned in (1e-6)."""
    model = model_of(name, dtype)
    result = eap(model, task)
    p = EdgePatcher(model, task)
    g = p.graph
    diff = p.ablated - p.clean_sources
    gm = resolve_metric(task, None, p.clean_logits_full)
    kv = g.kv_heads - 1
    checks = {"logits": lambda ds: shifted_input_derivatives(model, task, gm, "ln_final.hook_in", ds),
              "L1H3.q": lambda ds: one_head_input_derivatives(model, task, gm, 1, "q", 3, ds)}
    for qkv in "kv":
        dst = f"L1G{kv}.{qkv}" if g.group_size > 1 else f"L1H{kv}.{qkv}"
        checks[dst] = lambda ds, qkv=qkv: one_head_input_derivatives(model, task, gm, 1, qkv, kv, ds)
    if g.has_mlp:
        checks["MLP1"] = lambda ds: shifted_input_derivatives(model, task, gm, "blocks.1.ln2.hook_in", ds)
    rtol = 1e-4 if dtype == torch.float32 or name in FLOAT32_STEPS else 1e-6
    for dst, derivatives in checks.items():
        d = g.destination_names.index(dst)
        sources = torch.nonzero(g.valid[:, d]).flatten()
        oracle = torch.tensor(derivatives(diff[sources]), dtype=torch.float64)
        ours = result.values[sources, d].double()
        scale = float(oracle.abs().max())
        assert scale > 0, dst
        assert float((ours - oracle).abs().max()) <= rtol * scale, dst


@pytest.mark.parametrize("name", list(BUILDERS))
def test_exact_acdc_equals_the_reference_and_faithfulness_bounds(name, task):
    model = model_of(name, torch.float32)
    p = EdgePatcher(model, task)
    empty_kl = float(resolve_metric(task, "kl", p.clean_logits_full).loss(p.run(torch.zeros_like(p.graph.valid)[None])))
    threshold = empty_kl / 50  # random models' effects are small: a threshold on their scale keeps some edges
    result = acdc(model, task, threshold=threshold, metric="kl", progress=False)  # the threshold is a KL
    mask, _ = reference_acdc(model, task, threshold=threshold, metric="kl")
    assert torch.equal(result.circuit.members, mask)
    assert 0 < result.circuit.n_edges < ComputeGraph.of(model).n_edges  # something kept, something removed
    g = ComputeGraph.of(model)
    full = faithfulness(model, task, Circuit.full(g))
    empty = faithfulness(model, task, Circuit.full(g).with_members(torch.zeros_like(g.valid)))
    assert abs(full.normalised - 1) < 1e-5
    assert abs(empty.normalised) < 1e-5


def test_grouped_query_graph_has_one_k_and_v_input_per_group():
    g = ComputeGraph.of(model_of("llama", torch.float32))
    assert g.kv_heads == 2 and g.group_size == 2 and not g.pos_embed
    names = g.destination_names
    assert "L1G0.k" in names and "L1G1.v" in names and "L1H3.q" in names and "L1H0.k" not in names
    assert g.sources_of_destination(names.index("L1G1.k")) == [g.source_names.index(f"L1H{h}") for h in (2, 3)]
    assert g.n_destinations == 2 * (4 + 2 + 2 + 1) + 1


def test_parallel_mlp_reads_the_block_input():
    g = ComputeGraph.of(model_of("neox", torch.float32))
    assert g.parallel
    d = g.destination_names.index("MLP0")
    assert not g.valid[g.source_names.index("L0H0"), d] and g.valid[g.source_names.index("tok_embed"), d]


def test_unsupported_model_names_the_missing_feature():
    model = native(attn_scores_soft_cap=30.0)
    assert unsupported(model) == ["soft-capping"]
    with pytest.raises(ValueError, match="soft-capping"):
        Weights.of(model)


def test_gemma2_is_refused_with_each_missing_feature(task):
    """Gemma 2's soft-capping, sliding window and post-norms are not in the engine: the reason names each; the
    graph methods raise it; hook-based activation patching still runs."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from circuits.activations import activation_patch
    from circuits.models.random_hf import boot

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=20,
                          sliding_window=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = boot(Gemma2ForCausalLM(config), "gemma2", 24)
    reasons = unsupported(model)
    assert reasons[0].startswith("architecture 'Gemma2ForCausalLM' (supported: ") and "GemmaForCausalLM" in reasons[0]
    assert reasons[1:] == ["soft-capping", "sliding-window attention (window 4 < n_ctx 20)",
                           "norms on the attention and MLP outputs (post-norms)"]
    for run in (lambda: eap(model, task, progress=False), lambda: acdc(model, task, threshold=0.1, progress=False)):
        with pytest.raises(ValueError, match="soft-capping; sliding-window attention"):
            run()
    r = activation_patch(model, task, "resid_pre", per_position=False, progress=False)
    assert r.info["backend"] == "hooks" and torch.isfinite(r.values).all()


def test_zero_layer_model_is_its_direct_path():
    """A 0-layer model (embed → final norm → unembed, as the zoo's attn0l-bigram): the graph is the embeddings'
    edges into the logits; removing tok_embed → logits equals patching hook_embed through the bridge; EAP equals
    autograd; ACDC equals the reference; faithfulness of the full graph 1, of the empty one 0."""
    from circuits.models import attn_only
    from circuits.tasks.task import Task

    model = attn_only(0, 16, 4, 4, d_vocab=24, n_ctx=20, seed=0)
    perturb_norms_and_biases(model)
    gen = torch.Generator().manual_seed(0)
    clean, corrupted = (torch.randint(0, 24, (3, 8), generator=gen) for _ in range(2))
    pos = torch.arange(2, 6)
    task = Task("direct", clean, corrupted, answers=clean[:, pos + 1], positions=pos,
                wrong_answers=corrupted[:, pos + 1])
    p = EdgePatcher(model, task)
    g = p.graph
    assert g.source_names == ("tok_embed", "pos_embed") and g.destination_names == ("logits",) and g.n_edges == 2
    with torch.no_grad():
        assert (p.clean_logits_full - model(clean)).abs().max() < 1e-5
    mask = g.valid.clone()
    mask[0, 0] = False
    oracle = hooked(model, task, "hook_embed")
    change = float((p.run(mask[None])[0] - p.clean_logits).abs().max())
    assert float((p.run(mask[None])[0] - oracle).abs().max()) < 1e-5 < change
    eps = torch.zeros((), requires_grad=True)
    diff = p.ablated[0] - p.clean_sources[0]
    logits = model.run_with_hooks(clean, fwd_hooks=[("ln_final.hook_in", lambda x, hook: x + eps * diff)])
    gm = resolve_metric(task, None, p.clean_logits_full)
    (grad,) = torch.autograd.grad(gm.fn(logits[:, pos][None])[0], eps)
    assert abs(float(eap(model, task).values[0, 0]) - float(grad)) < 1e-5 * max(1.0, abs(float(grad)))
    result = acdc(model, task, threshold=1e-3, progress=False)
    assert torch.equal(result.circuit.members, reference_acdc(model, task, threshold=1e-3)[0])
    assert abs(faithfulness(model, task, Circuit.full(g)).normalised - 1) < 1e-5
    assert abs(faithfulness(model, task, Circuit.full(g).with_members(torch.zeros_like(g.valid))).normalised) < 1e-5


def test_activation_patching_runs_its_weights_backend_on_llama(task):
    """`auto` chooses the weights backend on LLaMA (rotary, grouped keys) and it agrees with the hooks; every
    architecture and site: tests/test_activations_architectures.py."""
    from circuits.activations import activation_patch
    from circuits.activations.engine import unsupported as fast_unsupported

    llama = model_of("llama", torch.float32)
    assert fast_unsupported(llama) == []
    fast = activation_patch(llama, task, "resid_pre", per_position=False, progress=False)
    slow = activation_patch(llama, task, "resid_pre", per_position=False, progress=False, backend="hooks")
    assert fast.info["backend"] == "weights"
    assert (fast.raw - slow.raw).abs().max() < 1e-6


def test_zero_layer_model_activations_side():
    """A 0-layer model: DLA by component is its direct path and its parts add up to the logit difference
    (embed + pos_embed + bias = total, exactly); the per-layer methods raise an error naming the model instead
    of returning empty tensors, and `valid_sites` lists no site."""
    from circuits.activations import activation_patch, attribution_patch, direct_logit_attribution
    from circuits.activations.sites import valid_sites
    from circuits.models import attn_only
    from circuits.tasks.task import Task

    model = attn_only(0, 16, 4, 4, d_vocab=24, n_ctx=20, seed=0)
    perturb_norms_and_biases(model)
    gen = torch.Generator().manual_seed(1)
    clean, corrupted = (torch.randint(0, 24, (3, 8), generator=gen) for _ in range(2))
    answers, wrong = torch.randint(0, 24, (2, 3), generator=gen)
    r = direct_logit_attribution(model, clean, answers, wrong, by="component")
    assert r.labels == (("embed", "pos_embed"),)
    with torch.no_grad():
        logits = model(clean)[:, -1]
    total = float((logits.gather(-1, answers[:, None]) - logits.gather(-1, wrong[:, None])).mean())
    assert abs(r.total - total) < 1e-5
    assert abs(float(r.values.sum()) + r.remainder + r.bias - total) < 1e-4 * max(1.0, abs(total))
    with pytest.raises(ValueError, match="by: a 0-layer model"):
        direct_logit_attribution(model, clean, answers, wrong, by="head")
    assert valid_sites(model) == []
    task = Task("direct", clean, corrupted, answers=clean[:, 6:7], positions=torch.tensor([5]),
                wrong_answers=corrupted[:, 6:7])
    for method in (activation_patch, attribution_patch):
        with pytest.raises(ValueError, match="0-layer model has no patching sites"):
            method(model, task, "resid_pre", progress=False)
