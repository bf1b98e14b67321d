"""The edge-patching engine against the bridge itself: full circuit = clean run, empty circuit = ablated run,
one patched edge = a hand-written hooked computation on the bridge, incremental = full runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from circuits.graph import ComputeGraph, patch_edges
from circuits.graph.incremental import circuit_state, commit_column, evaluate_column
from circuits.graph.nodes import NodeKind
from circuits.graph.patching import EdgePatcher
from circuits.models import ModelSpec, build
from circuits.tasks import induction_task


@pytest.fixture(scope="module")
def mlp3():
    """A random 3-layer model with GELU MLPs and LayerNorm."""
    return build(ModelSpec(3, 32, 4, 8, 24, 20, d_mlp=64, act_fn="gelu"), seed=3)


@pytest.fixture(scope="module")
def task24():
    return induction_task(8, 9, 24, seed=1)


def kl(ref_logits, logits):
    return F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)


@pytest.mark.parametrize("model_name", ["tiny2", "tiny2_noln", "mlp3"])
@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
def test_full_circuit_is_the_clean_run(request, task24, model_name, ablation):
    model = request.getfixturevalue(model_name)
    p = EdgePatcher(model, task24, ablation)
    with torch.no_grad():
        ref = model(task24.clean)[:, task24.positions]
    full = p.run(p.graph.valid[None])[0]
    assert (full - ref).abs().max() < 1e-5
    assert kl(ref, full).max() < 1e-6
    with torch.no_grad():
        everything = model(task24.clean)
    assert (p.clean_logits_full - everything).abs().max() < 1e-5


@pytest.mark.parametrize("model_name", ["tiny2", "mlp3"])
def test_empty_circuit_is_the_ablated_run(request, task24, model_name):
    model = request.getfixturevalue(model_name)
    none = torch.zeros_like(ComputeGraph.of(model).valid)[None]
    with torch.no_grad():
        corrupted = model(task24.corrupted)[:, task24.positions]
    resampled = patch_edges(model, task24, none, ablation="resample")[0]
    assert (resampled - corrupted).abs().max() < 1e-5
    assert kl(corrupted, resampled).max() < 1e-6
    # zero ablation: every destination reads only the output biases; mean: the batch-mean sources
    p = EdgePatcher(model, task24, "zero")
    out = p.run(none)[0]
    w = p.weights
    bias = w.b_O.sum(0) + (w.b_out.sum(0) if w.has_mlp else 0)
    expected = F.layer_norm(bias, bias.shape, w.ln_final.weight, w.ln_final.bias, w.ln_final.eps) @ w.W_U + w.b_U
    assert (out - expected).abs().max() < 1e-5


def source_output(model, cache, name: str):
    """A source's output from a bridge cache: the embeddings, a head's z @ W_O, an MLP's output without b_out."""
    if name == "tok_embed":
        return cache["hook_embed"]
    if name == "pos_embed":
        return cache["hook_pos_embed"].expand_as(cache["hook_embed"])
    if name.startswith("MLP"):
        layer = int(name[3:])
        return cache[f"blocks.{layer}.hook_mlp_out"] - model.b_out[layer]
    layer, head = (int(x) for x in name[1:].split("H"))
    return cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ model.W_O[layer, head]


def hooked_edge_patch(model, task, source: str, destination: str):
    """The logits with one edge resample-ablated, computed by the bridge with one hand-written hook."""
    tokens = task.clean
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens)
        _, corrupted = model.run_with_cache(task.corrupted)
    diff = source_output(model, corrupted, source) - source_output(model, clean, source)
    sd = model.state_dict()

    def ln(x, name):
        if model.cfg.normalization_type is None:
            return x
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], model.cfg.eps)

    if destination == "logits":
        def hook(x, hook):  # the input of the final LayerNorm
            return x + diff
        name = "ln_final.hook_in"
    elif destination.startswith("MLP"):
        layer = int(destination[3:])

        def hook(x, hook):  # the MLP's LayerNorm input is the MLP's residual input
            return x + diff
        name = f"blocks.{layer}.ln2.hook_in"
    else:
        head_name, qkv = destination.split(".")
        layer, head = (int(x) for x in head_name[1:].split("H"))
        W = {"q": model.W_Q, "k": model.W_K, "v": model.W_V}[qkv][layer, head]
        b = {"q": model.b_Q, "k": model.b_K, "v": model.b_V}[qkv][layer, head]
        patched = ln(clean[f"blocks.{layer}.hook_resid_pre"] + diff, f"blocks.{layer}.ln1") @ W + b

        def hook(x, hook):  # replace one head's q, k or v by its value on the patched input
            x = x.clone()
            x[:, :, head] = patched
            return x
        name = f"blocks.{layer}.attn.hook_{qkv}"
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])[:, task.positions]


@pytest.mark.parametrize("model_name,source,destination", [
    ("tiny2", "L0H1", "L1H2.q"), ("tiny2", "L0H3", "L1H0.k"), ("tiny2", "tok_embed", "L1H1.v"),
    ("tiny2", "tok_embed", "L0H2.q"), ("tiny2", "L1H3", "logits"), ("tiny2_noln", "L0H0", "L1H3.v"),
    ("mlp3", "MLP0", "L1H0.q"), ("mlp3", "L1H2", "MLP1"), ("mlp3", "MLP2", "logits"), ("mlp3", "L0H1", "L2H3.v"),
])
def test_one_edge_equals_hooked_computation(request, task24, model_name, source, destination):
    model = request.getfixturevalue(model_name)
    p = EdgePatcher(model, task24, "resample")
    e = p.graph.edge(source, destination)
    mask = p.graph.valid.clone()
    mask[e.src, e.dst] = False
    ours = p.run(mask[None])[0]
    oracle = hooked_edge_patch(model, task24, source, destination)
    clean = p.clean_logits
    assert (oracle - clean).abs().max() > 1e-3  # the patch does something
    assert (ours - oracle).abs().max() < 1e-5


@pytest.mark.parametrize("model_name", ["tiny2", "mlp3"])
@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_incremental_column_equals_full_runs(request, task24, model_name, ablation):
    model = request.getfixturevalue(model_name)
    p = EdgePatcher(model, task24, ablation)
    gen = torch.Generator().manual_seed(0)
    g = p.graph
    mask = g.valid & (torch.rand(g.valid.shape, generator=gen) < 0.7)
    assert_columns_equal_full_runs(p, mask, 4, 0.6, gen)


@pytest.mark.parametrize("model_name", ["tiny2", "tiny2_noln", "mlp3", "llama"])
def test_logits_through_the_changed_heads_equal_full_runs(request, task24, model_name, monkeypatch):
    """Where only heads change what the logits read, the candidates' logits come from each head's z times its
    W_O and the folded unembedding (`_Propagation.logits_through_heads`); they equal full patched runs, and the
    logit-difference columns do too."""
    from circuits.graph import incremental
    from circuits.models.random_hf import random_llama

    model = (random_llama(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=24, n_ctx=20, d_mlp=32)
             if model_name == "llama" else request.getfixturevalue(model_name))
    used, through_heads = [0], incremental._Propagation.logits_through_heads

    def spy(self, dst, x):
        logits = through_heads(self, dst, x)
        used[0] += logits is not None
        return logits

    monkeypatch.setattr(incremental._Propagation, "logits_through_heads", spy)
    p = EdgePatcher(model, task24, "resample")
    gen = torch.Generator().manual_seed(4)
    mask = p.graph.valid & (torch.rand(p.graph.valid.shape, generator=gen) < 0.7)
    mlps = [d for d, node in enumerate(p.graph.destinations) if node.kind is NodeKind.MLP]
    mask[:, mlps] = False  # the MLPs read their ablated inputs: no candidate changes them
    assert_columns_equal_full_runs(p, mask, 4, 0.6, gen)
    assert used[0] > 0
    p.logit_columns = torch.tensor([3, 5])  # as ACDC sets for a logit difference: the cache follows the columns
    state = circuit_state(p, mask)
    g, last = p.graph, p.graph.n_layers - 1
    h = next(h for h in range(g.n_heads) if mask[g.source_names.index(f"L{last}H{h}"), -1])  # read by the logits
    d = g.destination_names.index(f"L{last}H{h}.q")
    columns = mask[:, d][None].repeat(3, 1) & (torch.rand(3, g.n_sources, generator=gen) < 0.5)
    masks = mask[None].repeat(3, 1, 1)
    masks[:, :, d] = columns
    full = p.run(masks)[..., p.logit_columns]
    n = used[0]
    scale = float(full.abs().max())
    torch.testing.assert_close(evaluate_column(p, state, d, columns), full, rtol=1e-5, atol=1e-5 * scale)
    assert used[0] > n


def assert_columns_equal_full_runs(p: EdgePatcher, mask: torch.Tensor, k: int, keep: float, gen: torch.Generator):
    """For every destination, k random candidate columns (each edge of the circuit kept with probability `keep`)
    evaluated incrementally from the circuit's state equal full patched runs of the whole masks."""
    g = p.graph
    state = circuit_state(p, mask)
    for d in range(g.n_destinations):
        columns = mask[:, d][None].repeat(k, 1) & (torch.rand(k, g.n_sources, generator=gen) < keep)
        masks = mask[None].repeat(k, 1, 1)
        masks[:, :, d] = columns
        full = p.run(masks)
        scale = full.abs().max().clamp(min=1.0)
        assert ((evaluate_column(p, state, d, columns) - full).abs().max() / scale) < 1e-5


def dense_mask(g: ComputeGraph) -> torch.Tensor:
    """Every edge but a few: the edges from the first head of the second-to-last layer into the last layer's k
    inputs, and 3% at random. Most of a layer's inputs then keep the same edges (alike), and the inputs a
    change reaches cut few of the changed sources (read as the total change minus the cut ones)."""
    mask = g.valid & (torch.rand(g.valid.shape, generator=torch.Generator().manual_seed(4)) > 0.03)
    last = g.n_layers - 1
    src = g.source_names.index(f"L{last - 1}H0")
    for d, node in enumerate(g.destinations):
        if node.layer == last and node.qkv == "k":
            mask[src, d] = False
    return mask


@pytest.mark.parametrize("model_name", ["mlp3", "llama"])
def test_incremental_column_on_a_dense_circuit_equals_full_runs(request, task24, model_name, monkeypatch):
    """On a dense circuit the incremental evaluation shares the input of alike destinations, projects a layer's
    new inputs with one product per distinct input, and forms inputs as the total change minus the cut
    sources; the logits equal full patched runs (the same tolerance as any circuit's)."""
    from circuits.graph import incremental
    from circuits.models.random_hf import random_llama

    model = (random_llama(n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_vocab=24, n_ctx=20, d_mlp=32)
             if model_name == "llama" else request.getfixturevalue(model_name))
    p = EdgePatcher(model, task24, "resample")
    g = p.graph
    used = {"total": 0, "cut": 0, "grouped": 0}
    from_total, qkv_columns = incremental._Propagation.input_from_total, EdgePatcher.qkv_columns

    def spy_total(self, dst, at, cut):
        used["total"] += 1
        used["cut"] += len(cut) > 0
        return from_total(self, dst, at, cut)

    def spy_columns(self, layer, heads):
        used["grouped"] += len(heads) > 1
        return qkv_columns(self, layer, heads)

    monkeypatch.setattr(incremental._Propagation, "input_from_total", spy_total)
    monkeypatch.setattr(EdgePatcher, "qkv_columns", spy_columns)
    assert_columns_equal_full_runs(p, dense_mask(g), 3, 0.8, torch.Generator().manual_seed(5))
    assert used["total"] > 0 and used["cut"] > 0 and used["grouped"] > 0


def test_qkv_columns_stay_within_their_memory_budget(mlp3, task24, monkeypatch):
    """With room for a few sets of columns, the least recently used are dropped and made again when asked for:
    the cache stays within its budget while the dense circuit's evaluations still equal full runs."""
    p = EdgePatcher(mlp3, task24, "resample")
    W, b = p.qkv_columns(0, ((0, 0), (1, 0)))
    cache = p._qkv_columns
    cache.budget = 3 * (W.numel() + b.numel()) * W.element_size()
    asked, qkv_columns = set(), EdgePatcher.qkv_columns

    def spy(self, layer, heads):
        asked.add((layer, heads))
        return qkv_columns(self, layer, heads)

    monkeypatch.setattr(EdgePatcher, "qkv_columns", spy)
    assert_columns_equal_full_runs(p, dense_mask(p.graph), 3, 0.8, torch.Generator().manual_seed(5))
    held = sum(t.numel() * t.element_size() for entry in cache.values.values() for t in entry)
    assert held == cache.nbytes
    assert held <= cache.budget or len(cache.values) == 1
    assert len(asked) > len(cache.values)  # some sets were dropped


@pytest.mark.parametrize("model_name", ["tiny2", "mlp3"])
def test_committed_state_equals_full_forward(request, task24, model_name):
    """A chain of incremental commits (from the logits back, as ACDC makes them) equals a full forward of the
    final circuit where it is read: everywhere below the last layer, at the metric positions in it."""
    model = request.getfixturevalue(model_name)
    p = EdgePatcher(model, task24, "resample")
    g = p.graph
    gen = torch.Generator().manual_seed(2)
    state = circuit_state(p, g.valid)
    for d in reversed(range(g.n_destinations)):
        column = state.mask[:, d] & (torch.rand(g.n_sources, generator=gen) < 0.7)
        state = commit_column(p, state, d, column)
    full = circuit_state(p, state.mask)
    assert (state.logits - full.logits).abs().max() < 1e-5
    assert (state.sources_at - full.sources_at).abs().max() < 1e-5
    assert (state.inputs_at - full.inputs_at).abs().max() < 1e-5
    below = [i for i, node in enumerate(g.sources) if node.layer < g.n_layers - 1]
    assert (state.sources[below] - full.sources[below]).abs().max() < 1e-5


def test_batched_masks_equal_one_at_a_time(tiny2, task24):
    p = EdgePatcher(tiny2, task24)
    gen = torch.Generator().manual_seed(1)
    masks = p.graph.valid & (torch.rand(5, *p.graph.valid.shape, generator=gen) < 0.5)
    batched = p.run(masks)
    for i in range(5):
        assert (batched[i] - p.run(masks[i : i + 1])[0]).abs().max() < 1e-5


def test_model_is_left_unmodified(tiny2, task24):
    before = {k: v.clone() for k, v in tiny2.state_dict().items()}
    with torch.no_grad():
        logits = tiny2(task24.clean)
    p = EdgePatcher(tiny2, task24)
    p.run(torch.zeros_like(p.graph.valid)[None])
    assert all(torch.equal(before[k], v) for k, v in tiny2.state_dict().items())
    with torch.no_grad():
        assert torch.equal(tiny2(task24.clean), logits)
    assert not any(hp.hook_forward_hooks if hasattr(hp, "hook_forward_hooks") else False
                   for hp in tiny2.hook_dict.values())


def test_bad_input(tiny2, task24):
    p = EdgePatcher(tiny2, task24)
    # with run-time shape checking (the test suite) the annotation rejects it first, naming `masks`
    with pytest.raises((ValueError, TypeError), match="masks"):
        p.run(p.graph.valid.float()[None])
    with pytest.raises((ValueError, TypeError), match="masks"):
        p.run(p.graph.valid)
    with pytest.raises(ValueError, match="masks: expected a bool tensor"):
        p._check_masks(p.graph.valid[None, :, :3])
    with pytest.raises(ValueError, match="ablation must be one of"):
        EdgePatcher(tiny2, task24, "noise")
    long = induction_task(2, 12, 24)
    with pytest.raises(ValueError, match="n_ctx"):
        EdgePatcher(tiny2, long)


@pytest.mark.parametrize("metric", ["kl", "logit_diff", "logprob"])
def test_graph_metrics_equal_the_task_metric(tiny2, task24, metric):
    """The graph methods' metric (KL with the clean side precomputed) equals `Task.score_positions`."""
    from circuits.graph.metric import resolve_metric

    p = EdgePatcher(tiny2, task24)
    gm = resolve_metric(task24, metric, p.clean_logits_full)
    gen = torch.Generator().manual_seed(3)
    logits = p.clean_logits[None] + torch.randn(4, *p.clean_logits.shape, generator=gen) * torch.tensor(
        [0.0, 0.01, 0.3, 3.0])[:, None, None, None]
    expected = task24.with_metric(metric).score_positions(logits, p.clean_logits_full)
    torch.testing.assert_close(gm(logits), expected, atol=1e-6, rtol=1e-5)
    if metric == "kl":
        assert gm(logits)[0] == 0.0  # the clean run against itself


def metric_chain_mask(g: ComputeGraph) -> torch.Tensor:
    """Every edge but those from the MLPs into head inputs: each MLP's output then reaches the logits only through
    the MLPs above it (the chain a sparse ACDC circuit keeps), so each is read at the metric positions only."""
    mask = g.valid.clone()
    for s, node in enumerate(g.sources):
        if node.kind is NodeKind.MLP:
            for d, dst in enumerate(g.destinations):
                if dst.kind is NodeKind.HEAD_INPUT:
                    mask[s, d] = False
    return mask


@pytest.mark.parametrize("model_name", ["mlp3", "llama"])
def test_mlps_read_only_at_the_metric_positions_are_computed_there(request, task24, model_name, monkeypatch):
    """An MLP whose kept edges lead only to destinations read at the metric positions is recomputed there only;
    the candidates' logits equal full patched runs, and a chain of commits equals the full forward wherever the
    state keeps its values current (every source at the metric positions; elsewhere all but the stale ones)."""
    from circuits.graph import incremental
    from circuits.models.random_hf import random_llama

    model = (random_llama(n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_vocab=24, n_ctx=20, d_mlp=32)
             if model_name == "llama" else request.getfixturevalue(model_name))
    p = EdgePatcher(model, task24, "resample")
    g = p.graph
    mask = metric_chain_mask(g)
    mlp_inputs = [d for d, node in enumerate(g.destinations) if node.kind is NodeKind.MLP]
    at = incremental.read_at_metric_positions(p, mask)
    assert all(at[d] for d in mlp_inputs)
    assert not any(incremental.read_at_metric_positions(p, g.valid)[d] for d in mlp_inputs[:-1])

    rows, mlp = [], incremental.mlp
    monkeypatch.setattr(incremental, "mlp", lambda w, layer, x: rows.append(x.shape[-2]) or mlp(w, layer, x))
    assert_columns_equal_full_runs(p, mask, 3, 0.7, torch.Generator().manual_seed(6))
    assert rows and set(rows) == {len(task24.positions)}

    state = circuit_state(p, mask)
    gen = torch.Generator().manual_seed(7)
    for d in reversed(range(g.n_destinations)):
        state = commit_column(p, state, d, state.mask[:, d] & (torch.rand(g.n_sources, generator=gen) < 0.8))
    full = circuit_state(p, state.mask)
    assert {s for s, node in enumerate(g.sources) if node.kind is NodeKind.MLP} <= state.stale
    assert (state.logits - full.logits).abs().max() < 1e-5
    assert (state.sources_at - full.sources_at).abs().max() < 1e-5
    current = [s for s in range(g.n_sources) if s not in state.stale]
    assert (state.sources[current] - full.sources[current]).abs().max() < 1e-5


def test_an_edge_from_a_stale_output_into_a_full_position_input_is_refused(mlp3, task24):
    """A candidate that adds an edge from an output the state holds at the metric positions only into a
    destination read everywhere would read stale values: refused, naming the source."""
    p = EdgePatcher(mlp3, task24, "resample")
    g = p.graph
    state = circuit_state(p, metric_chain_mask(g))
    state = commit_column(p, state, g.destination_names.index("MLP0"), state.mask[:, g.destination_names.index("MLP0")])
    assert g.source_names.index("MLP0") in state.stale
    d = g.destination_names.index("L1H0.q")
    column = state.mask[:, d].clone()
    column[g.source_names.index("MLP0")] = True
    with pytest.raises(ValueError, match="columns: the edges from MLP0 into L1H0.q"):
        evaluate_column(p, state, d, column[None])
