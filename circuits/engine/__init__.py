"""The one forward engine: a supported bridge's weights (`Weights.of`), the reasons a model is refused
(`unsupported`, `ARCHITECTURES`), and the primitives every fast path builds on (norms, masks, rotary
embeddings, grouped keys and values, plain and gated MLPs, embed, unembed), and the one forward recorder
(`forward`, keeping what a caller asks for in a `Record`). `circuits.activations` and `circuits.graph` build
their runs on it; see docs/architecture.md."""

from circuits.engine.norm import Norm
from circuits.engine.primitives import (
    attention_bias,
    causal_bias,
    embed,
    expand_kv,
    hidden_keys,
    mlp,
    mlp_hidden,
    mlp_output,
    project_normed,
    rotate,
    unembed,
)
from circuits.engine.run import RECORDABLE, Record, forward
from circuits.engine.weights import ARCHITECTURES, Rotary, Weights, final_norm, unsupported

__all__ = [
    "ARCHITECTURES", "Norm", "RECORDABLE", "Record", "Rotary", "Weights", "attention_bias", "causal_bias", "embed",
    "expand_kv", "final_norm", "forward", "hidden_keys", "mlp", "mlp_hidden", "mlp_output", "project_normed",
    "rotate", "unembed",
    "unsupported",
]
