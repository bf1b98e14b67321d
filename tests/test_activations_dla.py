"""Direct logit attribution and the logit lens against exact identities and brute force from the cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from jaxtyping import TypeCheckError

from circuits.activations import direct_logit_attribution, logit_lens
from circuits.models import ModelSpec, build, planted_induction, random_gemma, random_llama, random_neox, random_qwen2

TOL = 1e-4
BY = ["component", "layer", "head"]


def _randomise_biases(model, seed: int):
    """Give every LayerNorm weight/bias and every bias (b_Q..b_O, MLP biases, b_U) random values, so that
    the bias terms and ln_final's weight are exercised (the freshly built ones are 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for name, t in sd.items():
        if t.ndim == 1 and t.is_floating_point():
            noise = 0.3 * torch.randn(t.shape, generator=gen)
            sd[name] = t + noise if name.endswith("weight") else noise
    model.load_state_dict(sd)
    return model


@pytest.fixture(scope="module")
def ln_mlp_model():
    """LayerNorm + MLPs, random LayerNorm weights and biases."""
    return _randomise_biases(build(ModelSpec(2, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=3), 1)


@pytest.fixture(scope="module")
def ln_attn_model():
    """Attention-only with LayerNorm, random LayerNorm weights and biases."""
    return _randomise_biases(build(ModelSpec(3, 32, 4, 8, 24, 20)), 2)


@pytest.fixture(scope="module")
def noln_model():
    """Attention-only without LayerNorm, random biases."""
    return _randomise_biases(build(ModelSpec(2, 32, 4, 8, 24, 20, layernorm=False), seed=4), 3)


MODELS = ["ln_mlp_model", "ln_attn_model", "noln_model"]


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 24, (4, 12), generator=gen)
    answers = torch.randint(0, 24, (4, 3), generator=gen)
    wrong = (answers + torch.randint(1, 24, (4, 3), generator=gen)) % 24
    return tokens, answers, wrong


def _actual(model, tokens, answers, wrong, pos) -> float:
    """The model's own mean logit (difference) at `pos`, from its forward."""
    with torch.no_grad():
        logits = model(tokens)[:, pos]
    out = logits.gather(-1, answers[..., None])
    if wrong is not None:
        out = out - logits.gather(-1, wrong[..., None])
    return float(out.mean())


# ------------------------------------------------------------------------------- the sum identity


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("by", BY)
def test_parts_sum_to_the_actual_logit_difference(request, data, model_name, by):
    """values.sum() + remainder + bias = the model's own output, for one and for several positions."""
    model = request.getfixturevalue(model_name)
    tokens, answers, wrong = data
    cases = [(-1, answers[:, 0], wrong[:, 0]), (torch.tensor([3, 7, 11]), answers, wrong),
             ([2, -1], answers[:, :2], None)]
    for positions, ans, wr in cases:
        r = direct_logit_attribution(model, tokens, ans, wr, by=by, positions=positions)
        pos = torch.as_tensor(positions).view(-1)
        actual = _actual(model, tokens, ans.view(len(tokens), -1), None if wr is None else wr.view(len(tokens), -1),
                         pos)
        assert r.total == pytest.approx(actual, abs=TOL)
        assert float(r.values.sum()) + r.remainder + r.bias == pytest.approx(actual, abs=TOL)
        assert r.info["by"] == by and r.info["difference"] == (wr is not None)
        if by == "component":
            assert r.remainder == pytest.approx(0.0, abs=1e-6)


def test_shapes_and_groupings_are_consistent(ln_mlp_model, data):
    tokens, answers, wrong = data
    L, H = ln_mlp_model.cfg.n_layers, ln_mlp_model.cfg.n_heads
    comp = direct_logit_attribution(ln_mlp_model, tokens, answers, wrong, by="component", positions=[3, 7, 11])
    layer = direct_logit_attribution(ln_mlp_model, tokens, answers, wrong, by="layer", positions=[3, 7, 11])
    head = direct_logit_attribution(ln_mlp_model, tokens, answers, wrong, by="head", positions=[3, 7, 11])
    names = list(comp.labels[0])
    assert names[:2] == ["embed", "pos_embed"] and len(names) == 2 + L * (H + 2)
    assert head.dims == ("layer", "head") and head.values.shape == (L, H)
    assert layer.dims == ("layer",) and layer.values.shape == (L,)
    for i in range(L):
        heads_i = [comp.values[names.index(f"L{i}H{h}")] for h in range(H)]
        torch.testing.assert_close(head.values[i], torch.stack(heads_i))
        block = sum(heads_i) + comp.values[names.index(f"L{i} b_O")] + comp.values[names.index(f"L{i} mlp")]
        torch.testing.assert_close(layer.values[i], block, atol=1e-6, rtol=1e-5)
    # by="head" leaves out embeddings, b_O and MLPs: they are its remainder
    left_out = comp.values.sum() - head.values.sum()
    assert head.remainder == pytest.approx(float(left_out), abs=1e-5)
    assert layer.remainder == pytest.approx(float(comp.values[:2].sum()), abs=1e-5)


ROTARY = {  # bias-free projections (W_O, W_U), rotary positions (no pos_embed), grouped or multi-query attention
    "llama": lambda: random_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=24, n_ctx=20, d_mlp=64),
    "gemma": lambda: random_gemma(n_layers=2, d_model=32, n_heads=4, d_vocab=24, n_ctx=20),
    "qwen2": lambda: random_qwen2(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=24, n_ctx=20, d_mlp=64),
    "neox": lambda: random_neox(n_layers=2, d_model=32, n_heads=4, d_vocab=24, n_ctx=20, d_mlp=64),
}


@pytest.mark.parametrize("name", list(ROTARY))
def test_parts_sum_to_the_logit_difference_on_rotary_bias_free_models(name, data):
    """The same identity on the LLaMA family, Gemma and GPT-NeoX: no pos_embed component, zero b_O and b_U
    where the checkpoint has none."""
    model = ROTARY[name]()
    tokens, answers, wrong = data
    pos = torch.tensor([3, 7, 11])
    actual = _actual(model, tokens, answers, wrong, pos)
    for by in BY:
        r = direct_logit_attribution(model, tokens, answers, wrong, by=by, positions=pos)
        assert r.total == pytest.approx(actual, abs=TOL)
        assert float(r.values.sum()) + r.remainder + r.bias == pytest.approx(actual, abs=TOL)
    comp = direct_logit_attribution(model, tokens, answers, wrong, by="component", positions=pos)
    assert comp.labels[0][:2] == ("embed", "L0H0") and comp.remainder == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------- brute force from the cache


def _brute_force(model, tokens, answers, wrong, pos):
    """Per head, embed and MLP: the cached output, centred (LayerNorm), divided by ln_final.hook_scale, times
    ln_final's weight, read by W_U[:, answer] − W_U[:, wrong]; mean over batch and positions."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    sd = model.state_dict()
    has_ln = model.cfg.normalization_type is not None
    d = model.cfg.d_model
    w_ln = sd["ln_final.weight"] if has_ln else torch.ones(d)
    W_U = model.W_U.detach()
    direction = (W_U[:, answers] - W_U[:, wrong]).permute(1, 2, 0)  # [batch, n, d_model]
    scale = cache["ln_final.hook_scale"][:, pos] if has_ln else torch.ones(len(tokens), len(pos), 1)

    def read(x):  # x [batch, n, d_model]
        if has_ln:
            x = x - x.mean(-1, keepdim=True)
        return float((x / scale * w_ln * direction).sum(-1).mean())

    heads = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][:, pos]  # [batch, n, head, d_head]
        for h in range(model.cfg.n_heads):
            heads[layer, h] = read(z[:, :, h] @ model.W_O[layer, h].detach())
    others = {"embed": read(cache["hook_embed"][:, pos]), "pos_embed": read(cache["hook_pos_embed"][:, pos])}
    if not model.cfg.attn_only:
        for layer in range(model.cfg.n_layers):
            others[f"L{layer} mlp"] = read(cache[f"blocks.{layer}.hook_mlp_out"][:, pos])
    b_ln = sd["ln_final.bias"] if has_ln else torch.zeros(d)
    b_U = model.b_U.detach()
    bias = float((b_ln * direction).sum(-1).mean() + (b_U[answers] - b_U[wrong]).mean())
    return heads, others, bias


@pytest.mark.parametrize("model_name", MODELS)
def test_per_head_dla_equals_brute_force(request, data, model_name):
    model = request.getfixturevalue(model_name)
    tokens, answers, wrong = data
    pos = torch.tensor([3, 7, 11])
    heads, others, bias = _brute_force(model, tokens, answers, wrong, pos)
    r = direct_logit_attribution(model, tokens, answers, wrong, by="head", positions=pos)
    assert heads.abs().max() > 0.01  # real contributions to compare against
    torch.testing.assert_close(r.values, heads, atol=TOL, rtol=0)
    assert r.bias == pytest.approx(bias, abs=TOL) and abs(bias) > 0.01
    comp = direct_logit_attribution(model, tokens, answers, wrong, by="component", positions=pos)
    names = list(comp.labels[0])
    for name, value in others.items():
        assert float(comp.values[names.index(name)]) == pytest.approx(value, abs=TOL), name


def test_planted_induction_head_dominates_the_direct_effect():
    """On [BOS, x, x] the planted induction head writes the answer's logit directly; nothing else does."""
    model = planted_induction()
    gen = torch.Generator().manual_seed(0)
    half = 8
    x = torch.stack([torch.randperm(model.cfg.d_vocab - 1, generator=gen)[:half] + 1 for _ in range(4)])
    tokens = torch.cat([torch.zeros(4, 1, dtype=torch.long), x, x], dim=1)
    pos = torch.arange(half + 1, 2 * half)
    answers = tokens[:, pos + 1]
    wrong = tokens[:, pos]  # the current token: not predicted
    r = direct_logit_attribution(model, tokens, answers, wrong, by="head", positions=pos)
    ind = model.planted.induction
    assert r.values[ind] > 5 and r.values.abs().sum() - r.values[ind].abs() < 0.5
    assert r.total == pytest.approx(_actual(model, tokens, answers, wrong, pos), abs=TOL)


# ------------------------------------------------------------------------------- the logit lens


@pytest.mark.parametrize("model_name", MODELS)
def test_logit_lens_equals_fresh_layernorm_of_the_cached_residual_stream(request, data, model_name):
    model = request.getfixturevalue(model_name)
    tokens = data[0]
    L = model.cfg.n_layers
    lens = logit_lens(model, tokens)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    assert lens.logits.shape == (L + 1, *logits.shape)
    # the last stage is the model's own output
    torch.testing.assert_close(lens.logits[-1], logits, atol=TOL, rtol=0)
    sd = model.state_dict()
    has_ln = model.cfg.normalization_type is not None

    def fresh(resid):
        if has_ln:
            resid = F.layer_norm(resid, (model.cfg.d_model,), sd["ln_final.weight"], sd["ln_final.bias"],
                                 model.cfg.eps)
        return resid @ model.W_U.detach() + model.b_U.detach()

    # stage 0 reads the embeddings; stage i ≥ 1 reads what block i − 1 writes out (resid_post)
    torch.testing.assert_close(lens.logits[0], fresh(cache["hook_embed"] + cache["hook_pos_embed"]),
                               atol=TOL, rtol=0)
    for i in range(1, L + 1):
        torch.testing.assert_close(lens.logits[i], fresh(cache[f"blocks.{i - 1}.hook_resid_post"]), atol=TOL,
                                   rtol=0)
    # values: mean log-prob of the next token; top_tokens: argmax
    logprobs = lens.logits.log_softmax(-1)[:, :, :-1]
    nxt = logprobs.gather(-1, tokens[:, 1:].expand(L + 1, -1, -1)[..., None])[..., 0]
    torch.testing.assert_close(lens.values, nxt.mean(1), atol=TOL, rtol=0)
    assert torch.equal(lens.top_tokens, lens.logits.argmax(-1))
    assert lens.dims == ("stage", "pos") and lens.values.shape == (L + 1, tokens.shape[1] - 1)
    assert lens.labels[0][-1] == "final"


def test_logit_lens_recomputes_the_scale_per_layer(ln_attn_model, data):
    """With LayerNorm, reusing the final cached scale at an earlier layer gives different logits."""
    tokens = data[0]
    lens = logit_lens(ln_attn_model, tokens)
    with torch.no_grad():
        _, cache = ln_attn_model.run_with_cache(tokens)
    sd = ln_attn_model.state_dict()
    resid = cache["blocks.0.hook_resid_post"]
    stale = ((resid - resid.mean(-1, keepdim=True)) / cache["ln_final.hook_scale"] * sd["ln_final.weight"]
             + sd["ln_final.bias"]) @ ln_attn_model.W_U.detach() + ln_attn_model.b_U.detach()
    assert (lens.logits[1] - stale).abs().max() > 0.1


# ------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(ln_mlp_model, data):
    model = ln_mlp_model
    tokens, answers, wrong = data
    # a batch mismatch: the runtime type checker sees it first under the test suite; both name `answers`
    with pytest.raises((ValueError, TypeCheckError), match="answers"):
        direct_logit_attribution(model, tokens, answers[:3, 0], wrong[:3, 0])
    with pytest.raises(ValueError, match=r"answers: .*\(4, 1\).*got \(4, 3\)"):
        direct_logit_attribution(model, tokens, answers, wrong)  # 3 answers per row for one position
    with pytest.raises(ValueError, match=r"wrong_answers: .*\(4, 3\).*got \(4, 2\)"):
        direct_logit_attribution(model, tokens, answers, wrong[:, :2], positions=[1, 2, 3])
    with pytest.raises(ValueError, match=r"positions: must lie in \[-12, 12\) for 12-token inputs; got \[3, 12\]"):
        direct_logit_attribution(model, tokens, answers[:, :2], wrong[:, :2], positions=[3, 12])
    with pytest.raises(ValueError, match=r"positions: must lie in \[-12, 12\)"):
        direct_logit_attribution(model, tokens, answers[:, 0], wrong[:, 0], positions=-13)
    with pytest.raises(ValueError, match="positions: .*got \\[\\]"):
        direct_logit_attribution(model, tokens, answers[:, 0], wrong[:, 0], positions=[])
    # under the test suite's runtime type checker the Literal annotation rejects it first; both name `by`
    with pytest.raises((ValueError, TypeCheckError), match="by"):
        direct_logit_attribution(model, tokens, answers[:, 0], wrong[:, 0], by="neuron")
    with pytest.raises((ValueError, TypeCheckError), match="tokens"):
        direct_logit_attribution(model, tokens[0], answers[:, 0], wrong[:, 0])
    with pytest.raises((ValueError, TypeCheckError), match="tokens"):
        logit_lens(model, tokens[0])
    with pytest.raises(ValueError, match=r"tokens: expected \[batch, pos\] with pos ≥ 2"):
        logit_lens(model, tokens[:, :1])
