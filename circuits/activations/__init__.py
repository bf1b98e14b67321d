"""Hook-based analysis: batched activation patching, attribution patching, direct logit attribution, logit lens.

Example: `activation_patch(model, task, "z").top(5)`; `attribution_patch(model, task, "z")`;
`direct_logit_attribution(model, tokens, answers, wrong)`; `logit_lens(model, tokens)`;
`tuned_lens(model, tokens, fit_tuned_lens(model, rows))`.
"""

from circuits.activations.attribution import attribution_patch
from circuits.activations.dla import DLAResult, direct_logit_attribution
from circuits.activations.logit_lens import LensResult, lens_logits, logit_lens
from circuits.activations.patching import activation_patch
from circuits.activations.result import PatchResult
from circuits.activations.sites import Site, valid_sites
from circuits.activations.tuned_lens import TunedLens, fit_tuned_lens, tuned_lens

__all__ = [
    "DLAResult", "LensResult", "PatchResult", "Site", "TunedLens", "activation_patch", "attribution_patch",
    "direct_logit_attribution", "fit_tuned_lens", "lens_logits", "logit_lens", "tuned_lens", "valid_sites",
]
