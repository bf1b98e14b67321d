"""The tuned lens: identity translators give the logit lens, training lowers KL to the final layer at every stage
on held-out tokens, the final stage's translator stays the identity, training is deterministic, and a saved lens
is checked on load."""

from __future__ import annotations

import json

import pytest
import torch
from jaxtyping import TypeCheckError

from circuits.activations import TunedLens, fit_tuned_lens, logit_lens, tuned_lens
from circuits.activations.tuned_lens import META, WEIGHTS
from circuits.models import attn_only
from circuits.tasks import repeated_random_tokens


@pytest.fixture(scope="module")
def model():
    """A random 2-layer model on repeated tokens: its stages disagree with the final layer, so there is KL to fit."""
    return attn_only(2, 32, 4, 8, d_vocab=24, n_ctx=24, seed=3)


def rows(n: int, seed: int) -> torch.Tensor:
    return repeated_random_tokens(n, 10, 24, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted(model):
    return fit_tuned_lens(model, rows(256, 0), steps=60, batch_size=16, progress=False)


def identity(model) -> TunedLens:
    S, d = model.cfg.n_layers + 1, model.cfg.d_model
    return TunedLens(torch.eye(d).repeat(S, 1, 1), torch.zeros(S, d))


def test_identity_translators_are_the_logit_lens(model):
    tokens = rows(8, 5)
    plain, tuned = logit_lens(model, tokens), tuned_lens(model, tokens, identity(model))
    torch.testing.assert_close(tuned.logits, plain.logits, rtol=0, atol=1e-5)
    assert torch.equal(tuned.top_tokens, plain.top_tokens)


def test_kl_to_final_matches_a_float64_kl_from_log_softmax(model):
    result = logit_lens(model, rows(8, 6))
    kl = result.kl_to_final().values
    logq = result.logits[:, :, :-1].double().log_softmax(-1)
    logp = logq[-1]
    brute = (logp.exp() * (logp - logq)).sum(-1).mean(1)  # [stage, pos]
    torch.testing.assert_close(kl.double(), brute, rtol=1e-4, atol=1e-6)
    assert float(kl[-1].abs().max()) == 0.0


def test_tuned_kl_is_at_most_the_logit_lens_kl_at_every_stage_on_held_out_rows(model, fitted):
    held = rows(64, 99)  # a seed apart from the training rows
    logit_kl = logit_lens(model, held).kl_to_final().values.mean(-1)
    tuned_kl = tuned_lens(model, held, fitted).kl_to_final().values.mean(-1)
    assert (tuned_kl[:-1] < logit_kl[:-1]).all(), (tuned_kl, logit_kl)
    assert float(tuned_kl[-1]) == pytest.approx(0.0, abs=1e-6)


def test_the_final_stages_translator_stays_the_identity(model, fitted):
    d = model.cfg.d_model
    assert float((fitted.weight[-1] - torch.eye(d)).abs().max()) < 1e-5
    assert float(fitted.bias[-1].abs().max()) < 1e-5
    assert float((fitted.weight[0] - torch.eye(d)).abs().max()) > 1e-3  # the other stages did move
    moved = TunedLens(fitted.weight.clone(), fitted.bias.clone(), fitted.info)
    moved.bias[-1, 0] = 1e-3
    with pytest.raises(ValueError, match="final stage"):
        tuned_lens(model, rows(4, 1), moved)


def test_training_is_deterministic_under_a_seed(model):
    a = fit_tuned_lens(model, rows(64, 0), steps=5, seed=7, progress=False)
    b = fit_tuned_lens(model, rows(64, 0), steps=5, seed=7, progress=False)
    c = fit_tuned_lens(model, rows(64, 0), steps=5, seed=8, progress=False)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


def test_the_model_is_not_modified(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_tuned_lens(model, rows(32, 0), steps=3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_save_and_load_round_trip_and_checks(model, fitted, tmp_path):
    fitted.save(tmp_path)
    back = TunedLens.load(tmp_path, model)
    assert torch.equal(back.weight, fitted.weight) and torch.equal(back.bias, fitted.bias)
    assert back.info == fitted.info
    other = attn_only(2, 32, 4, 8, d_vocab=24, n_ctx=24, seed=4)
    with pytest.raises(ValueError, match="other weights"):
        TunedLens.load(tmp_path, other)
    with pytest.raises(ValueError, match="stages"):
        TunedLens.load(tmp_path, attn_only(1, 32, 4, 8, d_vocab=24, n_ctx=24, seed=4))
    data = bytearray((tmp_path / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (tmp_path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        TunedLens.load(tmp_path, model)
    (tmp_path / META).write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="not a tuned lens"):
        TunedLens.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        TunedLens.load(tmp_path / "missing")


def test_bad_arguments_are_refused(model, fitted):
    # under the test suite's runtime type checker the shape annotations reject some first; both name the argument
    with pytest.raises((ValueError, TypeCheckError), match="tokens"):
        tuned_lens(model, rows(2, 0)[0], fitted)
    with pytest.raises(ValueError, match=r"tokens: expected \[batch, pos\] with pos ≥ 2"):
        tuned_lens(model, rows(2, 0)[:, :1], fitted)
    with pytest.raises(ValueError, match="steps"):
        fit_tuned_lens(model, rows(8, 0), steps=0)
    with pytest.raises((ValueError, TypeCheckError), match="weight"):
        TunedLens(torch.zeros(3, 4, 5), torch.zeros(3, 4))


def test_the_comparison_figure_draws_each_lens_kl_and_log_prob_per_stage(model, fitted):
    import numpy as np

    import viz

    tokens = rows(8, 11)
    results = {"logit lens": logit_lens(model, tokens), "tuned lens": tuned_lens(model, tokens, fitted)}
    fig = viz.draw_lens_comparison(results)
    assert len(fig.data) == 4 and fig.layout.yaxis.type == "log"
    for i, result in enumerate(results.values()):
        kl, logprob = fig.data[2 * i], fig.data[2 * i + 1]
        expected = result.kl_to_final().values.mean(-1).numpy()
        np.testing.assert_allclose(np.asarray(kl.y)[:-1], expected[:-1], rtol=1e-6)
        assert np.asarray(kl.y)[-1] > 0  # the final stage's 0 is drawn at the floor of the log axis
        np.testing.assert_allclose(np.asarray(logprob.y), result.values.mean(-1).numpy(), rtol=1e-6)
        assert list(kl.x) == list(result.labels[0])
    with pytest.raises(ValueError, match="lenses"):
        viz.draw_lens_comparison({})
