"""Verdicts: which heads form a circuit, named independently by each lens (weights, activations, discovery).

`induction_verdicts(model)` checks the induction behaviour, then names a layer-0 previous-token head and a
layer-1 induction head by each lens, with the evidence behind each choice, and says whether they agree.
"""

from circuits.verdicts.induction import (
    Behaviour,
    InductionVerdicts,
    Verdict,
    activations_verdict,
    check_behaviour,
    discovery_verdict,
    induction_task_for,
    induction_verdicts,
    pattern_verdict,
    weights_verdict,
)

__all__ = [
    "Behaviour", "InductionVerdicts", "Verdict", "activations_verdict", "check_behaviour", "discovery_verdict",
    "induction_task_for", "induction_verdicts", "pattern_verdict", "weights_verdict",
]
