"""Bad input at every public entry point, table-driven: one row per input class and entry point.

Each row asserts the error type and that the message names the argument (and, for ranges, the range); after
every row the model has no hook left on any hook point or module and its logits are bitwise what they were.
Degenerate tasks (zero clean − corrupted gap, a metric returning NaN) raise, or warn with the numbers where the
raw result still means something, and never return a normalised score computed from 0/0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch

from circuits.activations import activation_patch, attribution_patch, direct_logit_attribution, logit_lens
from circuits.graph import Circuit, ComputeGraph, acdc, eap, faithfulness, faithfulness_curve, roc, top_n_mask
from circuits.models import attn_only, train
from circuits.tasks import Task
from circuits.validate import DegenerateTaskWarning
from circuits.weights import path_expansion

D_VOCAB, N_CTX = 12, 8


@pytest.fixture(scope="module")
def model():
    return attn_only(2, 16, 4, 4, d_vocab=D_VOCAB, n_ctx=N_CTX, seed=1)


@pytest.fixture(scope="module")
def probe(model):
    """The model's logits on fixed tokens before any row ran, and the number of module hooks it has."""
    tokens = torch.arange(12).reshape(2, 6) % D_VOCAB
    with torch.no_grad():
        return tokens, model(tokens).clone(), _module_hooks(model)


def _module_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def good_task(**fields) -> Task:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, D_VOCAB, (3, 6), generator=gen)
    corrupted = torch.randint(0, D_VOCAB, (3, 6), generator=gen)
    base = dict(name="t", clean=clean, corrupted=corrupted, answers=torch.tensor([[1], [2], [3]]),
                wrong_answers=torch.tensor([[4], [5], [6]]), positions=torch.tensor([5]))
    return Task(**{**base, **fields})


def poke(task: Task, **fields) -> Task:
    """`task` with fields set past its own shape checks (what a caller can do to a frozen dataclass)."""
    task = replace(task)
    for k, v in fields.items():
        object.__setattr__(task, k, v)
    return task


def _neg(t):
    t = t.clone()
    t[0, 0] = -1
    return t


def _big(t):
    t = t.clone()
    t[-1, -1] = D_VOCAB
    return t


T = good_task()
TASKS = {
    "clean-negative": (good_task(clean=_neg(T.clean)), ValueError, r"task\.clean.*\[0, 12\).*negative"),
    "clean-too-large": (good_task(clean=_big(T.clean)), ValueError, r"task\.clean.*\[0, 12\)"),
    "corrupted-negative": (good_task(corrupted=_neg(T.corrupted)), ValueError, r"task\.corrupted.*\[0, 12\)"),
    "answers-negative": (good_task(answers=_neg(T.answers)), ValueError, r"task\.answers.*\[0, 12\)"),
    "answers-too-large": (good_task(answers=_big(T.answers)), ValueError, r"task\.answers.*\[0, 12\)"),
    "wrong-too-large": (good_task(wrong_answers=_big(T.wrong_answers)), ValueError, r"task\.wrong_answers.*\[0, 12\)"),
    "float-tokens": (poke(T, clean=T.clean.float(), corrupted=T.corrupted.float()), TypeError, r"task\.clean.*dtype"),
    "empty-batch": (T.subset(slice(0, 0)), ValueError, r"task\.clean.*empty"),
    "too-long": (good_task(clean=torch.zeros(3, 10, dtype=torch.long), corrupted=torch.ones(3, 10, dtype=torch.long)),
                 ValueError, r"task\.clean.*10 positions exceed.*n_ctx = 8"),
    "not-a-task": ("tokens", TypeError, r"(?s)task.*circuits\.tasks.*Task"),
}


def _full_circuit(model):
    return Circuit.full(ComputeGraph.of(model))


TASK_METHODS = {
    "activation_patch": lambda m, t: activation_patch(m, t, "z", progress=False),
    "activation_patch-hooks": lambda m, t: activation_patch(m, t, "resid_pre", backend="hooks", progress=False),
    "attribution_patch": lambda m, t: attribution_patch(m, t, "z", progress=False),
    "acdc": lambda m, t: acdc(m, t, threshold=0.01, progress=False),
    "eap": lambda m, t: eap(m, t, progress=False),
    "eap-ig": lambda m, t: eap(m, t, ig_steps=3, progress=False),
    "faithfulness": lambda m, t: faithfulness(m, t, _full_circuit(m)),
    "faithfulness_curve": lambda m, t: faithfulness_curve(m, t, torch.ones(ComputeGraph.of(m).valid.shape), [1, 2],
                                                          progress=False),
}


def _check_untouched(model, probe):
    tokens, logits, n_hooks = probe
    assert all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())
    assert _module_hooks(model) == n_hooks
    with torch.no_grad():
        assert torch.equal(model(tokens), logits)


@pytest.mark.parametrize("method", list(TASK_METHODS))
@pytest.mark.parametrize("case", list(TASKS))
def test_bad_task(model, probe, method, case):
    task, error, message = TASKS[case]
    with pytest.raises(error, match=message):
        TASK_METHODS[method](model, task)
    _check_untouched(model, probe)


GOOD_TOKENS = torch.arange(12).reshape(2, 6) % D_VOCAB
BAD_TOKENS = {
    "negative": (_neg(GOOD_TOKENS), ValueError, r"tokens.*\[0, 12\).*negative"),
    "too-large": (_big(GOOD_TOKENS), ValueError, r"tokens.*\[0, 12\)"),
    "float": (GOOD_TOKENS.float(), TypeError, r"tokens"),
    "empty-batch": (GOOD_TOKENS[:0], ValueError, r"tokens.*empty"),
    "too-long": (torch.zeros(2, 9, dtype=torch.long), ValueError, r"tokens.*9 positions exceed.*n_ctx = 8"),
    "one-dimensional": (GOOD_TOKENS[0], (ValueError, TypeError), r"tokens"),
}
TOKEN_METHODS = {
    "direct_logit_attribution": lambda m, t: direct_logit_attribution(m, t, torch.ones(len(t), dtype=torch.long)),
    "logit_lens": lambda m, t: logit_lens(m, t),
    "path_expansion": lambda m, t: path_expansion(m, t),
    "train": lambda m, t: train(m, t, steps=1, progress=False),
}


@pytest.mark.parametrize("method", list(TOKEN_METHODS))
@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_tokens(model, probe, method, case):
    tokens, error, message = BAD_TOKENS[case]
    if method == "train":  # train's token argument is `data`
        message = message.replace("tokens", "data")
    with pytest.raises(error, match=message):
        TOKEN_METHODS[method](model, tokens)
    _check_untouched(model, probe)



def _valid(model):
    return ComputeGraph.of(model).valid


OTHER_ARGUMENTS = {
    "dla-answers-negative": (lambda m: direct_logit_attribution(m, GOOD_TOKENS, torch.tensor([1, -2])),
                             ValueError, r"answers.*\[0, 12\)"),
    "dla-wrong-too-large": (lambda m: direct_logit_attribution(m, GOOD_TOKENS, torch.tensor([1, 2]),
                                                               torch.tensor([3, 12])), ValueError, r"wrong_answers"),
    "dla-answers-float": (lambda m: direct_logit_attribution(m, GOOD_TOKENS, torch.tensor([1.0, 2.0])),
                          TypeError, r"answers"),
    "logit_lens-one-position": (lambda m: logit_lens(m, GOOD_TOKENS[:, :1]), ValueError, r"tokens.*pos ≥ 2"),
    "activation_patch-positions": (lambda m: activation_patch(m, T, "z", positions=[6], progress=False),
                                   ValueError, r"positions.*\[0, 6\)"),
    "activation_patch-memory": (lambda m: activation_patch(m, T, "z", memory_mb=float("nan"), progress=False),
                                ValueError, r"memory_mb.*finite"),
    "activation_patch-batch_limit": (lambda m: activation_patch(m, T, "z", batch_limit=True, progress=False),
                                     ValueError, r"batch_limit"),
    "acdc-threshold-nan": (lambda m: acdc(m, T, threshold=math.nan, progress=False), ValueError, r"threshold.*finite"),
    "acdc-threshold-inf": (lambda m: acdc(m, T, threshold=math.inf, progress=False), ValueError, r"threshold.*finite"),
    "acdc-threshold-negative": (lambda m: acdc(m, T, threshold=-0.1, progress=False), ValueError, r"threshold.*>= 0"),
    "eap-ig_steps-negative": (lambda m: eap(m, T, ig_steps=-1, progress=False), ValueError, r"ig_steps.*>= 0"),
    "eap-ig_steps-float": (lambda m: eap(m, T, ig_steps=2.0, progress=False), (ValueError, TypeError), r"ig_steps"),
    "curve-n-negative": (lambda m: faithfulness_curve(m, T, torch.ones(_valid(m).shape), [4, -1], progress=False),
                         ValueError, r"ns.*>= 0"),
    "curve-n-float": (lambda m: faithfulness_curve(m, T, torch.ones(_valid(m).shape), [2.5], progress=False),
                      (ValueError, TypeError), r"ns"),
    "curve-no-n": (lambda m: faithfulness_curve(m, T, torch.ones(_valid(m).shape), [], progress=False),
                   ValueError, r"ns.*at least one"),
    "curve-nan-scores": (lambda m: faithfulness_curve(
        m, T, torch.ones(_valid(m).shape).masked_fill(_valid(m) & (torch.rand(_valid(m).shape) < 0.3), math.nan),
        [4], progress=False), ValueError, r"scores.*NaN"),
    "top_n_mask-negative": (lambda m: top_n_mask(torch.ones(_valid(m).shape), _valid(m), -1), ValueError, r"n.*>= 0"),
    "top_n-negative": (lambda m: _full_circuit(m).top_n(-3), ValueError, r"n.*>= 0"),
    "above-nan": (lambda m: _full_circuit(m).above(math.nan), ValueError, r"threshold.*finite"),
    "roc-nan-scores": (lambda m: roc(torch.full(_valid(m).shape, math.nan), _valid(m) & (torch.rand(_valid(m).shape)
                                                                                         < 0.5), _valid(m)),
                       ValueError, r"scores.*NaN"),
    "train-steps-zero": (lambda m: train(m, GOOD_TOKENS, steps=0, progress=False), ValueError, r"steps.*>= 1"),
    "train-lr-nan": (lambda m: train(m, GOOD_TOKENS, steps=1, lr=math.nan, progress=False), ValueError, r"lr"),
    "train-batch-zero": (lambda m: train(m, GOOD_TOKENS, steps=1, batch_size=0, progress=False), ValueError,
                         r"batch_size.*>= 1"),
    "train-callable-bad-batch": (lambda m: train(m, lambda b, g: torch.full((b, 4), 99), steps=1, progress=False),
                                 ValueError, r"data.*\[0, 12\)"),
}


@pytest.mark.parametrize("case", list(OTHER_ARGUMENTS))
def test_bad_argument(model, probe, case):
    call, error, message = OTHER_ARGUMENTS[case]
    with pytest.raises(error, match=message):
        call(model)
    _check_untouched(model, probe)


# degenerate tasks: clean and corrupted score the same, or a metric that is NaN

SAME = good_task(corrupted=T.clean.clone())


@pytest.mark.parametrize("method", ["acdc", "faithfulness", "faithfulness_curve"])
def test_zero_gap_raises_where_every_value_would_be_0_over_0(model, probe, method):
    with pytest.raises(ValueError, match=r"task \(full vs every edge ablated\).*score the same.*0/0"):
        TASK_METHODS[method](model, SAME)
    _check_untouched(model, probe)


@pytest.mark.parametrize("method", ["activation_patch", "activation_patch-hooks", "attribution_patch"])
def test_zero_gap_in_patching_warns_and_leaves_normalised_values_nan(model, probe, method):
    with pytest.warns(DegenerateTaskWarning, match=r"score the same \(metric .* vs .*\)"):
        result = TASK_METHODS[method](model, SAME)
    assert torch.isnan(result.values).all()
    assert torch.isfinite(result.raw).all()
    assert result.clean_metric == result.corrupted_metric
    _check_untouched(model, probe)


def _nan_metric(logits):
    return logits[..., 0, 0].mean() * math.nan


@pytest.mark.parametrize("call", [
    lambda m: activation_patch(m, T, "z", metric=_nan_metric, progress=False),
    lambda m: activation_patch(m, T, "z", metric=_nan_metric, backend="hooks", progress=False),
    lambda m: attribution_patch(m, T, "z", metric=_nan_metric, progress=False),
    lambda m: acdc(m, T, threshold=0.01, metric=_nan_metric, progress=False),
    lambda m: eap(m, T, metric=_nan_metric, progress=False),
    lambda m: faithfulness(m, T, _full_circuit(m), metric=_nan_metric),
], ids=["activation_patch", "activation_patch-hooks", "attribution_patch", "acdc", "eap", "faithfulness"])
def test_nan_metric_raises(model, probe, call):
    with pytest.raises(ValueError, match=r"metric.*NaN or inf"):
        call(model)
    _check_untouched(model, probe)


def test_acdc_on_logits_of_126_with_kl_stays_finite():
    """The issue's case: a 3-layer model without LayerNorm whose logits reach ~100; ACDC with its default KL
    used to end at loss −inf. Now every tested loss is finite and the circuit is the plain algorithm's."""
    from helpers import reference_acdc

    big = attn_only(3, 16, 4, 4, d_vocab=D_VOCAB, n_ctx=N_CTX, layernorm=False, seed=5)
    with torch.no_grad():
        for p in big.parameters():
            p.mul_(4.0)
    task = good_task()
    with torch.no_grad():
        assert big(task.clean).abs().max() > 60
    result = acdc(big, task, threshold=0.05, progress=False)
    assert math.isfinite(result.info["loss"])
    tested = result.values[~torch.isnan(result.values)]
    assert torch.isfinite(tested).all()
    mask, _ = reference_acdc(big, task, threshold=0.05)
    assert torch.equal(result.circuit.members, mask)


def test_valid_input_passes_without_warnings(model, probe):
    """Every entry point on good input: no error, no warning, the model untouched."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in TASK_METHODS.values():
            call(model, T)
        for name, call in TOKEN_METHODS.items():
            if name != "train":
                call(model, GOOD_TOKENS)
    _check_untouched(model, probe)


def test_progress_bars_can_be_silenced(model, capsys):
    eap(model, T, ig_steps=4, progress=False)
    attribution_patch(model, T, "z", progress=False)
    faithfulness_curve(model, T, torch.ones(_valid(model).shape), [1, 3], progress=False)
    assert capsys.readouterr().err == ""
    eap(model, T, ig_steps=4, progress=True)
    assert "EAP-IG steps" in capsys.readouterr().err
    attribution_patch(model, T, "z", progress=True)
    assert "attribution z" in capsys.readouterr().err
    faithfulness_curve(model, T, torch.ones(_valid(model).shape), [1, 3], progress=True)
    assert "faithfulness curve" in capsys.readouterr().err
