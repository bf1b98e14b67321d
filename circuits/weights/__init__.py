"""Weight-only analysis: full QK/OV circuits, path expansion, skip-trigrams, composition scores, head signatures.

Everything here reads the weights alone, except `path_expansion`, which takes the attention patterns and
LayerNorm scales of one forward pass.
"""

from circuits.weights.circuits import attention_scale, bigram_table, full_ov_circuit, full_qk_circuit
from circuits.weights.composition import (
    KINDS,
    CompositionBaseline,
    CompositionScores,
    all_composition_scores,
    composition_baseline,
    composition_scores,
    pair_mask,
)
from circuits.weights.paths import PathExpansion, path_expansion
from circuits.weights.signatures import (
    HeadClassification,
    HeadScores,
    classify_heads,
    copying_scores,
    induction_scores,
    offset_profile,
    positional_attention,
    positional_input,
    previous_token_scores,
    uniform_previous_attention,
)
from circuits.weights.skip_trigrams import SkipTrigrams, skip_trigram_scores, skip_trigrams

__all__ = [
    "KINDS", "CompositionBaseline", "CompositionScores", "HeadClassification", "HeadScores", "PathExpansion",
    "SkipTrigrams", "all_composition_scores", "attention_scale", "bigram_table", "classify_heads",
    "composition_baseline", "composition_scores", "copying_scores", "full_ov_circuit", "full_qk_circuit",
    "induction_scores", "offset_profile", "pair_mask", "path_expansion", "positional_attention", "positional_input",
    "previous_token_scores", "skip_trigram_scores", "skip_trigrams", "uniform_previous_attention",
]
