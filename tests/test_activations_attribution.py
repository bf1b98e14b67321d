"""Attribution patching against exact identities (linear sites), activation patching (sign, correlation),
an independent hook-and-autograd first-order estimate, and a count of forward passes."""

from __future__ import annotations

import pytest
import torch

from circuits.activations import Site, activation_patch, attribution_patch, engine
from circuits.models import ModelSpec, attn_only, build, planted_induction
from circuits.models.zoo import load_pretrained
from circuits.tasks import induction_task

BACKENDS = ["weights", "hooks"]
DIRECTIONS = ["denoising", "noising"]


@pytest.fixture(scope="module")
def task():
    return induction_task(3, 5, 24, seed=1)


@pytest.fixture(scope="module")
def linear_model():
    """Attention-only, no LayerNorm: the logit difference is linear in the last layer's z, v, pattern,
    attn_out and resid_post."""
    return attn_only(2, 32, 4, 8, d_vocab=24, n_ctx=20, layernorm=False, seed=2)


@pytest.fixture(scope="module")
def mlp_model():
    """A native bridge with MLPs and LayerNorm (so resid_mid exists)."""
    return build(ModelSpec(2, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=3)


def _no_hooks(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def _last_layer(result):
    """The effect of every component of the last layer (index 0 of each result is the layer)."""
    return result.effect[-1]


# ------------------------------------------------------------------------------- exact when linear


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("site", ["z", "v", "pattern", "attn_out", "resid_post"])
def test_equals_activation_patching_where_the_metric_is_linear(linear_model, task, site, direction):
    """Logit difference, no LayerNorm: the last layer's site enters the logits linearly, so the first-order
    estimate is the patching effect itself (measured max |difference| ≤ 4e-8 against effects up to 3e-3)."""
    model = linear_model
    last = model.cfg.n_layers - 1
    heads = [(last, h) for h in range(model.cfg.n_heads)] if Site(site).per_head else None
    ref = activation_patch(model, task, site, direction=direction, heads=heads, progress=False)
    exact = _last_layer(ref)
    assert exact.abs().max() > 1e-5  # a real effect to compare against
    for backend in BACKENDS:
        ours = attribution_patch(model, task, site, direction=direction, backend=backend, heads=heads)
        assert ours.dims == ref.dims and ours.labels == ref.labels and ours.direction == direction
        assert ours.info["backend"] == backend and ours.method == "attribution_patch"
        assert ours.clean_metric == pytest.approx(ref.clean_metric, rel=1e-5, abs=1e-6)
        assert ours.corrupted_metric == pytest.approx(ref.corrupted_metric, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(_last_layer(ours), exact, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.raw[-1], ref.raw[-1], rtol=1e-5, atol=1e-6)
        if heads is not None:
            assert ours.raw[:-1].isnan().all()  # heads restricts the components


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_positions_at_once_is_the_sum_over_positions(linear_model, task, backend):
    per_pos = attribution_patch(linear_model, task, "z", backend=backend)
    together = attribution_patch(linear_model, task, "z", per_position=False, backend=backend)
    torch.testing.assert_close(together.effect, per_pos.effect.sum(-1), rtol=1e-5, atol=1e-6)
    # and, linear at the last layer, it equals patching every position of a head at once
    ref = activation_patch(linear_model, task, "z", per_position=False, progress=False)
    torch.testing.assert_close(together.effect[-1], ref.effect[-1], rtol=1e-5, atol=1e-7)


def test_mlp_model_without_layernorm_is_exact_at_the_last_resid_post(task):
    """With MLPs but no LayerNorm, the last resid_post is still read linearly by the unembedding."""
    model = build(ModelSpec(2, 32, 4, 8, 24, 20, layernorm=False, d_mlp=64, act_fn="gelu"), seed=5)
    for backend in BACKENDS:
        for direction in DIRECTIONS:
            ours = attribution_patch(model, task, "resid_post", direction=direction, backend=backend)
            ref = activation_patch(model, task, "resid_post", direction=direction, progress=False)
            torch.testing.assert_close(_last_layer(ours), _last_layer(ref), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------- an independent oracle


def _first_order_oracle(model, task, site: str, direction: str) -> torch.Tensor:
    """(source − base activation) · ∂metric/∂activation, summed per component, computed with transformer_lens
    hooks that add a zero leaf requiring grad to each activation (its gradient is the activation's, and the
    graph through earlier layers is kept); effect layout [layer, (head,) pos]."""
    site = Site(site)
    L = model.cfg.n_layers
    base, src = (task.corrupted, task.clean) if direction == "denoising" else (task.clean, task.corrupted)
    names = [site.hook_name(layer) for layer in range(L)]
    with torch.no_grad():
        clean_logits = model(task.clean)
        _, cache = model.run_with_cache(src)
    leaves: dict[str, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(act, hook):
            leaves[name] = torch.zeros_like(act, requires_grad=True)
            acts[name] = act.detach().clone()
            if site is Site.RESID_MID:
                # the bridge's hook_resid_mid is ln2's input: a returned tensor would reach the MLP only, an
                # in-place change reaches the residual stream too (as transformer_lens's in-place patching)
                return act.add_(leaves[name])
            return act + leaves[name]
        return hook

    with torch.enable_grad():
        logits = model.run_with_hooks(base, fwd_hooks=[(n, make_hook(n)) for n in names])
        value = task.score(logits, clean_logits)
        grads = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True)
    out = []
    for n, g in zip(names, grads):
        g = torch.zeros_like(acts[n]) if g is None else g
        prod = (cache[n] - acts[n]) * g
        if site is Site.PATTERN:  # [batch, head, dest, src] -> [head, dest]
            out.append(prod.sum(dim=(0, 3)))
        elif site.per_head:  # [batch, pos, head, d] -> [head, pos]
            out.append(prod.sum(dim=(0, 3)).T)
        else:  # [batch, pos, d_model] -> [pos]
            out.append(prod.sum(dim=(0, 2)))
    return torch.stack(out)


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post", "attn_out", "z", "q", "k", "v",
                                  "pattern"])
def test_mlp_model_equals_an_independent_first_order_estimate(mlp_model, task, site):
    """MLPs and LayerNorm (nonlinear): every site that exists there, both directions and backends, against
    hooks + autograd."""
    for direction in DIRECTIONS:
        ref = _first_order_oracle(mlp_model, task, site, direction)
        assert ref.abs().max() > 1e-5
        for backend in BACKENDS:
            ours = attribution_patch(mlp_model, task, site, direction=direction, backend=backend)
            assert ours.effect.shape == ref.shape
            torch.testing.assert_close(ours.effect, ref, rtol=1e-4, atol=1e-6)


def test_mlp_model_logprob_metric_matches_the_oracle(mlp_model, task):
    lp = task.with_metric("logprob")
    for backend in BACKENDS:
        ours = attribution_patch(mlp_model, lp, "z", backend=backend)
        torch.testing.assert_close(ours.effect, _first_order_oracle(mlp_model, lp, "z", "denoising"),
                                   rtol=1e-4, atol=1e-6)
        assert ours.metric == "logprob"


# ------------------------------------------------------------------------------- the sign convention


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _top_signs_agree(estimate: torch.Tensor, exact: torch.Tensor, k: int) -> bool:
    top = exact.flatten().abs().argsort(descending=True)[:k]
    return bool((estimate.flatten()[top].sign() == exact.flatten()[top].sign()).all())


def test_planted_model_agrees_with_activation_patching():
    """Denoising z per head × position on the hand-built induction model: measured Pearson r = 0.9996, the
    top 10 components agree in sign and the top 5 are the same components. (Noising measures r = 0.65: the
    previous-token head's sharp softmax is saturated on the clean run, so its gradient misses a large effect.)"""
    model = planted_induction()
    task = induction_task(8, 10, model.cfg.d_vocab, seed=4)
    est = attribution_patch(model, task, "z")
    exact = activation_patch(model, task, "z", progress=False)
    assert _pearson(est.effect, exact.effect) > 0.99
    assert _top_signs_agree(est.effect, exact.effect, 10)
    top5 = set(exact.effect.flatten().abs().argsort(descending=True)[:5].tolist())
    assert top5 == set(est.effect.flatten().abs().argsort(descending=True)[:5].tolist())
    # the top component is the planted induction head, positive (it restores the clean logit difference)
    layer, head, _ = torch.unravel_index(est.effect.flatten().abs().argmax(), est.effect.shape)
    assert (int(layer), int(head)) == model.planted.induction and est.effect.max() > 0


@pytest.mark.parametrize("direction,min_r", [("denoising", 0.97), ("noising", 0.8)])
def test_zoo_induction_model_agrees_with_activation_patching(direction, min_r):
    """A trained 2-layer model with LayerNorm: measured Pearson r = 0.988 (denoising), 0.872 (noising)."""
    model = load_pretrained("attn2l-induction")
    task = induction_task(8, 10, model.cfg.d_vocab, seed=4)
    est = attribution_patch(model, task, "z", direction=direction)
    exact = activation_patch(model, task, "z", direction=direction, progress=False)
    assert _pearson(est.effect, exact.effect) > min_r
    assert _top_signs_agree(est.effect, exact.effect, 5)


# ------------------------------------------------------------------------------- cost


class _ForwardCounter:
    """Counts full forward passes: calls of the weights engine's `run` and of the model's `hook_embed`
    (every bridge forward embeds once), with the batch size of each."""

    def __init__(self, model, monkeypatch):
        self.batches: list[int] = []
        real = engine.run

        def counted_run(w, tokens):
            self.batches.append(tokens.shape[0])
            return real(w, tokens)

        monkeypatch.setattr(engine, "run", counted_run)
        self._handle = model.hook_dict["hook_embed"].register_forward_hook(
            lambda module, args, out: self.batches.append(out.shape[0]))

    def close(self):
        self._handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_at_most_three_forwards_whatever_the_number_of_components(task, monkeypatch, backend):
    small = attn_only(1, 16, 2, 8, d_vocab=24, n_ctx=20, seed=6)  # 1 × 2 heads
    large = attn_only(3, 32, 8, 4, d_vocab=24, n_ctx=20, seed=7)  # 3 × 8 heads
    long_task = induction_task(3, 9, 24, seed=2)
    for model, t in ((small, task), (large, long_task)):  # 22 and 456 (head, position) components
        counter = _ForwardCounter(model, monkeypatch)
        try:
            # the counter sees each kind of forward once
            model(t.clean)
            model.run_with_cache(t.clean)
            engine.run(engine.Weights.of(model), t.clean)
            assert counter.batches == [t.batch] * 3
            counter.batches.clear()
            for site, direction in (("z", "denoising"), ("z", "noising"), ("resid_pre", "denoising")):
                attribution_patch(model, t, site, direction=direction, backend=backend)
                # both runs are needed; at most one more forward, and no components stacked into a batch
                assert 2 <= len(counter.batches) <= 3, (site, direction, counter.batches)
                assert set(counter.batches) == {t.batch}
                counter.batches.clear()
        finally:
            counter.close()
    assert _no_hooks(small) and _no_hooks(large)


# ------------------------------------------------------------------------------- hooks and errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_are_removed_after_success_and_after_a_failing_metric(mlp_model, task, backend):
    before = mlp_model(task.clean)
    attribution_patch(mlp_model, task, "resid_mid", backend=backend)
    assert _no_hooks(mlp_model)

    def boom(logits):
        raise RuntimeError("metric failed")

    for direction in DIRECTIONS:
        with pytest.raises(RuntimeError, match="metric failed"):
            attribution_patch(mlp_model, task, "z", metric=boom, direction=direction, backend=backend)
        assert _no_hooks(mlp_model)
    with pytest.raises(ValueError, match="metric: expected a callable returning a scalar"):
        attribution_patch(mlp_model, task, "v", metric=lambda logits_at: logits_at[:, -1, 0], backend=backend)
    assert _no_hooks(mlp_model)
    torch.testing.assert_close(mlp_model(task.clean), before, atol=0, rtol=0)  # the model is unchanged


def test_custom_metric_matches_the_oracle(mlp_model, task):
    """A custom metric reads the logits at the task's metric positions [batch, n, vocab] (the one contract)."""
    def last_logprob_of_3(logits_at):
        return logits_at[:, -1].log_softmax(-1)[:, 3].mean()

    pos = task.positions[-1:]
    custom_task = type(task)("last", task.clean, task.corrupted, torch.full((task.batch, 1), 3), pos,
                             metric="logprob")
    ref = _first_order_oracle(mlp_model, custom_task, "k", "denoising")
    for backend in BACKENDS:
        ours = attribution_patch(mlp_model, task, "k", metric=last_logprob_of_3, backend=backend)
        assert ours.metric == "last_logprob_of_3"
        torch.testing.assert_close(ours.effect, ref, rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_clear_errors(linear_model, task):
    with pytest.raises(ValueError, match="resid_mid.*attention-only"):
        attribution_patch(linear_model, task, "resid_mid")
    with pytest.raises(ValueError, match="'mlp_out' is not a patching site"):
        attribution_patch(linear_model, task, "mlp_out")
    with pytest.raises(ValueError, match=r"positions: positions must lie in \[0, 11\).*\[11\]"):
        attribution_patch(linear_model, task, "z", positions=[2, 11])
    with pytest.raises(ValueError, match="heads: .* out of range"):
        attribution_patch(linear_model, task, "z", heads=[(2, 0)])
    with pytest.raises(ValueError, match="heads: site 'resid_pre' is not per head"):
        attribution_patch(linear_model, task, "resid_pre", heads=[(0, 0)])
    assert _no_hooks(linear_model)
