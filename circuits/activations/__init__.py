"""Hook-based analysis: batched activation patching, attribution patching, direct logit attribution, logit lens.

Example: `activation_patch(model, task, "z").top(5)`; `attribution_patch(model, task, "z")`;
`direct_logit_attribution(model, tokens, answers, wrong)`; `logit_lens(model, tokens)`.
"""

from circuits.activations.attribution import attribution_patch
from circuits.activations.dla import DLAResult, direct_logit_attribution
from circuits.activations.logit_lens import LensResult, lens_logits, logit_lens
from circuits.activations.patching import activation_patch
from circuits.activations.result import PatchResult
from circuits.activations.sites import Site, valid_sites

__all__ = [
    "DLAResult", "LensResult", "PatchResult", "Site", "activation_patch", "attribution_patch",
    "direct_logit_attribution", "lens_logits", "logit_lens", "valid_sites",
]
