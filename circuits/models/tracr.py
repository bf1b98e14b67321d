"""tracr-compiled programs as native bridges: `from_tracr(assembled)` and a few compiled RASP programs.

tracr (`pip install circuits[tracr]`) compiles a RASP program into transformer weights: one-hot residual
subspaces per variable, attention and ReLU MLP layers, no LayerNorm, bidirectional attention by default.
`from_tracr` turns the assembled model into a `TransformerBridge.boot_native` model whose logits equal
tracr's own output on every input:

- the config comes from transformer_lens's `make_tracr_transformer_bridge_config` (for a numerical output,
  the same with one output column);
- the weights are tracr's, in the bridge's state-dict names (transformer_lens's
  `make_tracr_transformer_bridge_state_dict` names the MLP weights `fc_in`/`fc_out`, which the bridge's
  `load_state_dict` silently skips, leaving random MLPs, so the names are mapped here and loaded strictly);
- the unembedding is tracr's own output projection, read by applying tracr's unembed module to the
  identity: for a categorical output one logit per output value (transformer_lens's
  `make_tracr_categorical_unembed`, checked equal to tracr's), for a numerical output one "logit", the value;
- heads: tracr gives every layer the most heads any layer uses and pads the others with all-zero heads (and
  all-zero MLPs where a layer has none); they stay in the bridge as zero weights, as in tracr.

Position 0 holds tracr's BOS token, which the compiled attention uses as a default key; tracr's output
there is meaningless (its decoder replaces it by BOS), so tasks read positions 1..n.

Example:
    program = compile_program("reverse")
    model = from_tracr(program.assembled)
    model(model.tracr.tokens([[1, 2, 3, 3]]))  # [1, 5, 3] logits
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import TransformerBridge

INSTALL_HINT = "tracr is an optional extra: pip install 'circuits[tracr]' (tracr-pypi and jax's CPU wheel)"


@dataclass(frozen=True)
class TracrInfo:
    """What a converted tracr model computes: `model.tracr`.

    `vocab` the program's input values (sorted as tracr encodes them), `token_ids` value → token id, `bos`
    the BOS token id, `max_seq_len` the longest input (positions 1..max_seq_len; n_ctx = max_seq_len + 1),
    `output` "categorical" or "numerical", `output_values` the categorical output value of each logit
    (None for numerical), `residual_labels` tracr's name of each residual dimension ("tokens:a", "one", ...).
    """

    vocab: tuple[Any, ...]
    token_ids: dict[Any, int]
    bos: int
    max_seq_len: int
    output: str
    output_values: tuple[Any, ...] | None
    residual_labels: tuple[str, ...]

    def tokens(self, inputs: Sequence[Sequence[Any]]) -> Int[Tensor, "batch pos"]:
        """Token ids [batch, 1 + len] of program inputs of one length, each prefixed with BOS.
        Example: `model.tracr.tokens([[1, 2, 3]])`"""
        rows = [list(x) for x in inputs]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError("inputs: expected a non-empty list of program inputs of one length")
        if not 1 <= len(rows[0]) <= self.max_seq_len:
            raise ValueError(f"inputs: length {len(rows[0])}, expected 1..{self.max_seq_len}")
        unknown = {v for r in rows for v in r if v not in self.token_ids or v not in self.vocab}
        if unknown:
            raise ValueError(f"inputs: values {sorted(map(str, unknown))} are not in the program's vocab {self.vocab}")
        return torch.tensor([[self.bos] + [self.token_ids[v] for v in r] for r in rows])

    def domain(self, length: int | None = None) -> list[tuple[Any, ...]]:
        """Every input of `length` (default max_seq_len) values from the vocab, in lexicographic order."""
        length = self.max_seq_len if length is None else length
        return list(itertools.product(self.vocab, repeat=length))


@dataclass(frozen=True, eq=False)
class CompiledProgram:
    """A RASP program compiled by tracr: `assembled` (tracr's AssembledTransformerModel) and how it was made."""

    name: str
    assembled: Any
    vocab: tuple[Any, ...]
    max_seq_len: int
    bos: str

    def bridge(self) -> TransformerBridge:
        """`from_tracr(self.assembled)`."""
        return from_tracr(self.assembled)


def _require_tracr() -> None:
    try:
        import haiku  # noqa: F401
        import tracr  # noqa: F401
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e


def _programs() -> dict[str, tuple[Callable[[], Any], tuple[Any, ...], int]]:
    """name → (RASP program factory, vocab, max_seq_len). `reverse` and `frac_prevs` as in the ACDC paper's
    tracr experiments; `hist` (how often each token occurs) and `sort_unique` as further categorical ones;
    `same_neighbours` (1 where the tokens before and after a position are equal) has two heads in its second
    layer and none in its first, which tracr pads with two all-zero heads."""
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return {
        "reverse": (lambda: lib.make_reverse(rasp.tokens), (1, 2, 3), 4),
        "frac_prevs": (lambda: lib.make_frac_prevs(rasp.numerical(rasp.Map(lambda x: x == "x", rasp.tokens))),
                       ("a", "b", "x"), 4),
        "hist": (lib.make_hist, ("a", "b", "c"), 4),
        "sort_unique": (lambda: lib.make_sort_unique(rasp.tokens, rasp.tokens), (1, 2, 3, 4), 4),
        "same_neighbours": (_same_neighbours, ("a", "b"), 4),
    }


def _same_neighbours() -> Any:
    from tracr.rasp import rasp

    def neighbour(shift: int) -> Any:
        at = rasp.Map(lambda i: i + shift, rasp.indices)
        return rasp.categorical(rasp.Aggregate(rasp.Select(rasp.indices, at, rasp.Comparison.EQ), rasp.tokens))

    return rasp.categorical(rasp.SequenceMap(lambda a, b: int(a == b), neighbour(-1), neighbour(1)))


PROGRAMS = ("reverse", "frac_prevs", "hist", "sort_unique", "same_neighbours")
"""The names `compile_program` knows."""


def compile_program(name: str, *, vocab: Sequence[Any] | None = None, max_seq_len: int | None = None,
                    bos: str = "BOS") -> CompiledProgram:
    """Compile one of `PROGRAMS` with tracr (a few seconds), optionally with another vocab or length.
    Example: `compile_program("frac_prevs").assembled.apply(["BOS", "a", "x"]).decoded`"""
    _require_tracr()
    programs = _programs()
    if name not in programs:
        raise ValueError(f"name: expected one of {PROGRAMS}, got {name!r}")
    make, default_vocab, default_len = programs[name]
    vocab = tuple(default_vocab if vocab is None else vocab)
    max_seq_len = default_len if max_seq_len is None else max_seq_len
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    from tracr.compiler import compiling

    assembled = compiling.compile_rasp_to_model(make(), vocab=set(vocab), max_seq_len=max_seq_len, compiler_bos=bos)
    return CompiledProgram(name, assembled, tuple(sorted(vocab, key=str)), max_seq_len, bos)


def from_tracr(assembled: Any, *, dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """A native bridge computing what the tracr-assembled model computes; `model.tracr` is its `TracrInfo`.

    Categorical outputs give one logit per output value (tracr's own output is their argmax); numerical
    outputs give one logit, the value. Raises ValueError for a model with LayerNorm (tracr compiles none).
    Example: `model = from_tracr(compile_program("reverse").assembled)`
    """
    _require_tracr()
    from transformer_lens.utilities import tracr as tl_tracr

    if not hasattr(assembled, "params") or not hasattr(assembled, "model_config"):
        raise ValueError(f"assembled: expected a tracr AssembledTransformerModel, got {type(assembled).__name__}")
    if assembled.model_config.layer_norm:
        raise ValueError("assembled: tracr models with layer_norm=True are not supported")
    unembed = tracr_unembed(assembled)
    categorical = isinstance(getattr(assembled.output_encoder, "encoding_map", None), dict)
    if categorical:
        cfg = tl_tracr.make_tracr_transformer_bridge_config(assembled)
        tl_unembed = tl_tracr.make_tracr_categorical_unembed(assembled)
        if not np.array_equal(tl_unembed, unembed):
            raise AssertionError("transformer_lens's categorical unembed differs from tracr's own")
        order = sorted(assembled.output_encoder.encoding_map.items(), key=lambda kv: kv[1])
        output_values = tuple(v for v, _ in order)
    else:  # transformer_lens's config builder reads the categorical encoder only: give it one output column
        one_output = SimpleNamespace(model_config=assembled.model_config, params=assembled.params,
                                     output_encoder=SimpleNamespace(encoding_map={"value": 0}))
        cfg = tl_tracr.make_tracr_transformer_bridge_config(one_output)
        output_values = None
    cfg.dtype = dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransformerBridge.boot_native(cfg)
    model.load_state_dict(_state_dict(assembled, unembed, dtype), strict=True)
    model.eval()
    enc = assembled.input_encoder
    bos = enc.bos_token
    vocab = tuple(sorted((v for v in enc.encoding_map if v not in (bos, enc.pad_token)), key=str))
    model.tracr = TracrInfo(vocab, dict(enc.encoding_map), enc.encoding_map[bos], cfg.n_ctx - 1,
                            "categorical" if categorical else "numerical", output_values,
                            tuple(assembled.residual_labels))
    return model


def tracr_unembed(assembled: Any) -> np.ndarray:
    """tracr's output projection [d_model, d_out]: its unembed module (without the argmax) applied to the
    identity, so the numerical and categorical cases read the same matrix tracr multiplies by."""
    import haiku as hk
    import jax.numpy as jnp

    d_model = np.asarray(assembled.params["token_embed"]["embeddings"]).shape[1]
    project = hk.transform(lambda x: assembled.get_compiled_model().unembed(x, use_unembed_argmax=False))
    out = np.asarray(project.apply({}, None, jnp.eye(d_model)), dtype=np.float64)
    return out.reshape(d_model, -1)


def tracr_forward(assembled: Any, inputs: Sequence[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """tracr's own forward (`assembled.forward`, what `apply` runs) on a batch of inputs of one length, BOS
    prepended: (logits [batch, pos, d_out], tracr's `unembedded` output [batch, pos]). The logits are tracr's
    final residual stream times its unembed projection; for a categorical output `unembedded` is their
    argmax, for a numerical one the value itself.
    Example: `logits, out = tracr_forward(program.assembled, [(1, 2, 3, 3)])`"""
    import jax
    import jax.numpy as jnp

    enc = assembled.input_encoder
    ids = jnp.array([enc.encode([enc.bos_token, *x]) for x in inputs])
    out = jax.jit(assembled.forward)(assembled.params, ids)
    residual = np.asarray(out.transformer_output.output, dtype=np.float64)
    return residual @ tracr_unembed(assembled), np.asarray(out.unembedded_output)


def _state_dict(assembled: Any, unembed: np.ndarray, dtype: torch.dtype) -> dict[str, Tensor]:
    """tracr's weights under the native bridge's state-dict names (nn.Linear layout: [out, in])."""
    params = assembled.params

    def t(module: str, name: str) -> Tensor:
        return torch.tensor(np.asarray(params[module][name]), dtype=dtype)

    sd = {
        "embed.weight": t("token_embed", "embeddings"),
        "pos_embed.weight": t("pos_embed", "embeddings"),
        "unembed.weight": torch.tensor(unembed.T, dtype=dtype).contiguous(),
        "unembed.bias": torch.zeros(unembed.shape[1], dtype=dtype),
    }
    names = {"q": "attn/query", "k": "attn/key", "v": "attn/value", "o": "attn/linear",
             "in": "mlp/linear_1", "out": "mlp/linear_2"}
    for layer in range(assembled.model_config.num_layers):
        for ours, theirs in names.items():
            part = "attn" if theirs.startswith("attn") else "mlp"
            module = f"transformer/layer_{layer}/{theirs}"
            sd[f"blocks.{layer}.{part}.{ours}.weight"] = t(module, "w").T.contiguous()
            sd[f"blocks.{layer}.{part}.{ours}.bias"] = t(module, "b")
    return sd
