"""Hook-based analysis: batched activation patching, attribution patching, direct logit attribution, logit lens."""

from circuits.activations.patching import activation_patch
from circuits.activations.result import PatchResult
from circuits.activations.sites import Site, valid_sites

__all__ = ["PatchResult", "Site", "activation_patch", "valid_sites"]
