"""Activation patching against transformer_lens's own functions, a plain hooked loop, and a planted model."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tlp
from jaxtyping import TypeCheckError

from circuits.activations import Site, activation_patch, attribution_patch
from circuits.models import ModelSpec, build, random_gpt2
from circuits.tasks import Task, induction_task

TOL = 1e-5

# (site, per_position) -> (transformer_lens function, permutation of its axes into ours)
ORACLES = {
    ("resid_pre", True): (tlp.get_act_patch_resid_pre, None),
    ("resid_mid", True): (tlp.get_act_patch_resid_mid, None),
    ("attn_out", True): (tlp.get_act_patch_attn_out, None),
    ("z", True): (tlp.get_act_patch_attn_head_out_by_pos, (0, 2, 1)),
    ("q", True): (tlp.get_act_patch_attn_head_q_by_pos, (0, 2, 1)),
    ("k", True): (tlp.get_act_patch_attn_head_k_by_pos, (0, 2, 1)),
    ("v", True): (tlp.get_act_patch_attn_head_v_by_pos, (0, 2, 1)),
    ("pattern", True): (tlp.get_act_patch_attn_head_pattern_by_pos, None),
    ("z", False): (tlp.get_act_patch_attn_head_out_all_pos, None),
    ("q", False): (tlp.get_act_patch_attn_head_q_all_pos, None),
    ("k", False): (tlp.get_act_patch_attn_head_k_all_pos, None),
    ("v", False): (tlp.get_act_patch_attn_head_v_all_pos, None),
    ("pattern", False): (tlp.get_act_patch_attn_head_pattern_all_pos, None),
}


@pytest.fixture(scope="module")
def mlp_model():
    """A native bridge with MLPs (so resid_mid exists)."""
    return build(ModelSpec(2, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=3)


@pytest.fixture(scope="module")
def gpt2_tiny():
    """A GPT-2-shaped model with random weights, through boot_transformers, with a locally built tokenizer."""
    return random_gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=40, n_ctx=24)


@pytest.fixture(scope="module")
def task():
    return induction_task(3, 5, 24, seed=1)


def _tl_oracle(model, task, site, per_position, metric=None):
    fn, perm = ORACLES[(site, per_position)]
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(task.clean)
        score = metric or (lambda logits: task.score(logits, clean_logits))
        ref = fn(model, task.corrupted, clean_cache, score)
    return ref.permute(*perm) if perm else ref


def _loop_oracle(model, task, site, per_position, direction):
    """One hooked forward per component, written independently of the library."""
    L, H, P = model.cfg.n_layers, model.cfg.n_heads, task.seq_len
    site = Site(site)
    base, src = (task.clean, task.corrupted) if direction == "noising" else (task.corrupted, task.clean)
    with torch.no_grad():
        clean_logits = model(task.clean)
        _, cache = model.run_with_cache(src)
    shape = [L] + ([H] if site.per_head else []) + ([P] if per_position else [])
    out = torch.zeros(shape)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).view(-1, len(shape)).tolist():
        layer, rest = idx[0], idx[1:]
        name = site.hook_name(layer)

        def hook(act, hook, rest=rest, name=name):
            sel = [slice(None)] * act.ndim
            if site is Site.PATTERN:  # [batch, head, dest, src]
                sel[1] = rest[0]
                if per_position:
                    sel[2] = rest[1]
            elif site.per_head:  # [batch, pos, head, d]
                sel[2] = rest[0]
                if per_position:
                    sel[1] = rest[1]
            elif per_position:
                sel[1] = rest[0]
            act[tuple(sel)] = cache[name][tuple(sel)]
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(base, fwd_hooks=[(name, hook)])
        out[tuple(idx)] = task.score(logits, clean_logits)
    return out


@pytest.mark.parametrize("backend", ["weights", "hooks"])
@pytest.mark.parametrize("site,per_position", list(ORACLES))
def test_denoising_equals_transformer_lens(mlp_model, task, site, per_position, backend):
    ours = activation_patch(mlp_model, task, site, per_position=per_position, progress=False, backend=backend)
    ref = _tl_oracle(mlp_model, task, site, per_position)
    assert ours.raw.shape == ref.shape
    torch.testing.assert_close(ours.raw, ref.float(), atol=TOL, rtol=0)
    assert ours.direction == "denoising" and ours.info["backend"] == backend


@pytest.mark.parametrize("site,per_position", [("resid_post", True), ("resid_pre", False), ("z", True),
                                               ("k", True), ("pattern", False), ("resid_mid", False)])
def test_noising_equals_one_forward_per_component(mlp_model, task, site, per_position):
    ours = activation_patch(mlp_model, task, site, per_position=per_position, direction="noising", progress=False)
    ref = _loop_oracle(mlp_model, task, site, per_position, "noising")
    torch.testing.assert_close(ours.raw, ref, atol=TOL, rtol=0)
    # normalised: 1 at the clean baseline, 0 at the corrupted one
    torch.testing.assert_close(ours.values, (ref - ours.corrupted_metric) / (ours.clean_metric - ours.corrupted_metric))


def test_attention_only_sites_and_kl_metric(tiny2, task):
    """Attention-only model (no resid_mid), KL metric (full vocabulary at the metric positions)."""
    kl = task.with_metric("kl")
    for site in ("z", "resid_pre", "v"):
        ours = activation_patch(tiny2, kl, site, progress=False)
        torch.testing.assert_close(ours.raw, _tl_oracle(tiny2, kl, site, True), atol=TOL, rtol=0)
    noised = activation_patch(tiny2, task.with_metric("logprob"), "resid_post", direction="noising", progress=False)
    ref = _loop_oracle(tiny2, task.with_metric("logprob"), "resid_post", True, "noising")
    torch.testing.assert_close(noised.raw, ref, atol=TOL, rtol=0)


def test_gpt2_shaped_model_equals_transformer_lens(gpt2_tiny):
    model = gpt2_tiny
    task = induction_task(2, 5, model.cfg.d_vocab, seed=2)
    for site, per_position in [("z", True), ("resid_mid", True), ("pattern", False), ("q", False)]:
        ours = activation_patch(model, task, site, per_position=per_position, progress=False)
        assert ours.info["backend"] == "weights"
        torch.testing.assert_close(ours.raw, _tl_oracle(model, task, site, per_position), atol=TOL, rtol=0)
    # token strings label the positions when the model has a tokenizer
    assert ours.dims == ("layer", "head") and activation_patch(
        model, task, "resid_pre", progress=False).labels[1][1] == "1:" + model.to_str_tokens(task.clean[0])[1]


def test_clean_into_clean_has_no_effect(mlp_model, task):
    same = Task("same", task.clean, task.clean.clone(), task.answers, task.positions, task.wrong_answers)
    for site in ("resid_pre", "z", "q", "pattern", "resid_mid", "attn_out"):
        for direction in ("denoising", "noising"):
            r = activation_patch(mlp_model, same, site, direction=direction, progress=False)
            # the same function through another code path: zero up to float32 rounding
            assert r.effect.abs().max() < 1e-6, (site, direction)


def test_batching_does_not_change_results(mlp_model, task):
    a = activation_patch(mlp_model, task, "k", progress=False, batch_limit=1)
    b = activation_patch(mlp_model, task, "k", progress=False)
    torch.testing.assert_close(a.raw, b.raw, atol=TOL, rtol=0)


def test_heads_and_positions_restrict_components(mlp_model, task):
    full = activation_patch(mlp_model, task, "z", progress=False)
    part = activation_patch(mlp_model, task, "z", heads=[(1, 2), (0, 0)], positions=[3, 7], progress=False)
    kept = torch.zeros_like(full.raw, dtype=torch.bool)
    for layer, head in [(1, 2), (0, 0)]:
        kept[layer, head, [3, 7]] = True
    torch.testing.assert_close(part.raw[kept], full.raw[kept], atol=TOL, rtol=0)
    assert part.raw[~kept].isnan().all()


def test_planted_model_picks_out_the_planted_heads(planted):
    """Noising shows both planted heads as necessary; denoising restores the metric only through the induction
    head (a clean previous-token output cannot help while the corrupted induction head reads corrupted tokens)."""
    task = induction_task(8, 10, planted.cfg.d_vocab, seed=4)
    prev, ind = planted.planted.previous_token, planted.planted.induction
    noising = activation_patch(planted, task, "z", per_position=False, direction="noising", progress=False)
    assert noising.values[prev] < 0.1 and noising.values[ind] < 0.1  # normalised: 0 = corrupted baseline
    assert min(noising.values[h] for h in planted.planted.inert) > 0.95
    denoising = activation_patch(planted, task, "z", per_position=False, progress=False)
    assert denoising.values[ind] > 0.9
    others = [denoising.values[h].abs() for h in [prev, *planted.planted.inert]]
    assert max(others) < 0.05
    top1 = {tuple(int(x[1:]) for x in (lab[0], lab[1])) for lab, _ in denoising.top(1)}
    assert top1 == {ind}


# ------------------------------------------------------------------------------------------- bad input


def _no_hooks(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_bad_site_names_the_valid_ones(tiny2, task):
    with pytest.raises(ValueError, match="resid_mid.*attention-only.*valid sites: resid_pre, resid_post"):
        activation_patch(tiny2, task, "resid_mid", progress=False)
    with pytest.raises(ValueError, match="'mlp_in' is not a patching site; valid sites"):
        activation_patch(tiny2, task, "mlp_in", progress=False)


def test_bad_inputs_raise_clear_errors(tiny2, task):
    with pytest.raises(ValueError, match=r"clean and corrupted must have the same shape.*\(3, 11\).*\(3, 10\)"):
        Task("bad", task.clean, task.corrupted[:, :-1], task.answers, task.positions, task.wrong_answers)
    broken = Task("t", task.clean, task.corrupted, task.answers, task.positions, task.wrong_answers)
    object.__setattr__(broken, "corrupted", task.corrupted[:2])
    with pytest.raises(ValueError, match="clean .* and corrupted .* must have the same shape"):
        activation_patch(tiny2, broken, "z", progress=False)
    with pytest.raises(ValueError, match=r"positions: positions must lie in \[0, 11\).*\[11\]"):
        activation_patch(tiny2, task, "z", positions=[2, 11], progress=False)
    with pytest.raises(ValueError, match="heads: .* out of range"):
        activation_patch(tiny2, task, "z", heads=[(2, 0)], progress=False)
    # under the test suite's runtime type checker the Literal annotation rejects it first; both name the argument
    with pytest.raises((ValueError, TypeCheckError), match="direction"):
        activation_patch(tiny2, task, "z", direction="sideways", progress=False)
    assert _no_hooks(tiny2)


@pytest.mark.parametrize("backend", ["weights", "hooks"])
def test_non_scalar_metric_raises_and_hooks_are_removed(tiny2, task, backend):
    with pytest.raises(ValueError, match="metric: expected a callable returning a scalar"):
        activation_patch(tiny2, task, "z", metric=lambda logits_at: logits_at[:, -1, 0], backend=backend,
                         progress=False)
    assert _no_hooks(tiny2)

    def boom(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        activation_patch(tiny2, task, "v", metric=boom, backend=backend, progress=False)
    assert _no_hooks(tiny2)


def test_custom_metric_matches_transformer_lens(tiny2, task):
    """A custom metric receives the logits at the task's metric positions [batch, n, vocab] (the one contract)."""
    def last_logprob_of_3(logits_at):
        assert logits_at.shape[:2] == (task.batch, len(task.positions))
        return logits_at[:, -1].log_softmax(-1)[:, 3].mean()

    ours = activation_patch(tiny2, task, "q", metric=last_logprob_of_3, progress=False)
    oracle = _tl_oracle(tiny2, task, "q", True, lambda logits: last_logprob_of_3(task.read_logits(logits)))
    torch.testing.assert_close(ours.raw, oracle, atol=TOL, rtol=0)
    assert ours.metric == "last_logprob_of_3"


@pytest.mark.parametrize("backend", ["weights", "hooks"])
@pytest.mark.parametrize("metric", ["kl", "logprob"])
def test_named_metric_equals_one_forward_per_component(tiny2, task, metric, backend):
    """`metric="kl"` / `"logprob"` scores the task's data by that metric: equal to the brute-force loop on the
    task re-scored, in both directions, for patching and (its estimate) attribution."""
    for direction in ("denoising", "noising"):
        ours = activation_patch(tiny2, task, "z", metric=metric, direction=direction, backend=backend,
                                progress=False)
        ref = _loop_oracle(tiny2, task.with_metric(metric), "z", True, direction)
        torch.testing.assert_close(ours.raw, ref, atol=TOL, rtol=0)
        assert ours.metric == metric
    attributed = attribution_patch(tiny2, task, "z", metric=metric, backend=backend)
    same = attribution_patch(tiny2, task.with_metric(metric), "z", backend=backend)
    torch.testing.assert_close(attributed.raw, same.raw, atol=0, rtol=0)
    assert attributed.metric == metric


def test_metric_argument_is_checked(tiny2, task):
    with pytest.raises(ValueError, match="metric must be one of"):
        activation_patch(tiny2, task, "z", metric="accuracy", progress=False)
    no_wrong = Task("t", task.clean, task.corrupted, task.answers, task.positions, metric="logprob")
    with pytest.raises(ValueError, match="'logit_diff' needs a task with wrong_answers"):
        activation_patch(tiny2, no_wrong, "z", metric="logit_diff", progress=False)


def _sharp_model(dtype: torch.dtype):
    """Queries scaled up until most heads attend almost only to one key: the case where the one-key update
    must not compute the other keys' share as z − a_p v_p when p is that key (it would cancel)."""
    model = build(ModelSpec(2, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attn._original_component.q._original_component.weight"):
                param.mul_(60.0)
    return model.to(dtype)


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "attn_out", "z", "q", "pattern"])
def test_one_key_update_with_near_one_hot_attention(task, site):
    """Against transformer_lens run in float64 (in float32 its own error here, 7e-6 for resid_pre, is
    larger than ours)."""
    model, model64 = _sharp_model(torch.float32), _sharp_model(torch.float64)
    _, cache = model.run_with_cache(task.corrupted)
    top = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"].amax(-1) for i in range(2)])
    assert (top > 1 - 1e-4).float().mean() > 0.5  # the set-up is what it says
    ref = _tl_oracle(model64, task, site, True).float()
    ours = activation_patch(model, task, site, progress=False).raw
    torch.testing.assert_close(ours, ref, atol=TOL * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("site", ["resid_pre", "z", "attn_out"])
def test_three_layers_equal_transformer_lens(site):
    """Three layers: a patch in layer 0 resumes layer 1 from its position on (suffix keys and values) before
    the last layer."""
    model = build(ModelSpec(3, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=5)
    t = induction_task(3, 6, 24, seed=2)
    ref = _tl_oracle(model, t, site, True)
    for limit in (None, 2):  # chunks of two components start after position 0 (all but the first)
        ours = activation_patch(model, t, site, progress=False, batch_limit=limit).raw
        torch.testing.assert_close(ours, ref, atol=TOL * float(ref.abs().max()), rtol=0)


def test_weights_read_again_after_the_model_changes(task):
    """The weights engine caches what it reads per model; changing a parameter in place (as an optimiser step
    does) must be seen by the next call."""
    model = build(ModelSpec(2, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=11)
    before = activation_patch(model, task, "z", progress=False).raw
    with torch.no_grad():
        dict(model.named_parameters())["layers.0._original_component.attn._original_component.q."
                                        "_original_component.weight"].mul_(3.0)
    after = activation_patch(model, task, "z", progress=False).raw
    ref = _tl_oracle(model, task, "z", True)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, ref, atol=TOL * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "z", "q", "k", "pattern"])
def test_patches_that_write_the_base_value_cost_no_forward(mlp_model, site, monkeypatch):
    """Clean and corrupted differ at one position (4): every activation before it is the same in both runs
    (attention is causal), and in the embeddings' block so is every later position's resid_pre. Those
    components equal the corrupted baseline exactly, the rest transformer_lens, and none of them is run."""
    import importlib

    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 24, (3, 9), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 4] = (clean[:, 4] + 5) % 23 + 1
    task = Task("one-token", clean, corrupted, clean[:, 5:8], torch.tensor([5, 6, 7]), clean[:, 1:4])
    patching = importlib.import_module("circuits.activations.patching")
    run_positions = []

    def spy(resume, src, s, c):
        run_positions.extend((c.layer, p) for p in c.pos.tolist())
        return patched_resid(resume, src, s, c)

    patched_resid = patching.patched_resid
    monkeypatch.setattr(patching, "patched_resid", spy)
    ours = activation_patch(mlp_model, task, site, progress=False)
    monkeypatch.undo()
    torch.testing.assert_close(ours.raw, _tl_oracle(mlp_model, task, site, True).float(), atol=TOL, rtol=0)
    baseline = torch.tensor(ours.corrupted_metric, dtype=ours.raw.dtype)
    assert (ours.raw[..., :4] == baseline).all()
    assert all(p >= 4 for _, p in run_positions)
    if site == "resid_pre":  # layer 0 reads the embeddings: only position 4 differs there
        assert [p for layer, p in run_positions if layer == 0] == [4]
        assert (ours.raw[0, 5:] == baseline).all()
