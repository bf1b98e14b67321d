"""Lenses side by side: the logit lens against the tuned lens, stage by stage."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from circuits.activations import LensResult
from viz.labelled import as_array
from viz.theme import SERIES, TEMPLATE


def draw_lens_comparison(lenses: Mapping[str, LensResult], *,
                         title: str = "lenses compared, stage by stage") -> go.Figure:
    """Two panels over the stages (the residual stream entering each layer, then the final one): the mean
    KL(final ‖ stage) in nats (log scale), and the mean log-probability of the actual next token.

    `lenses` maps a name to a `LensResult` of the same tokens, for example
    `{"logit lens": logit_lens(m, t), "tuned lens": tuned_lens(m, t, lens)}`. The final stage's KL is 0 by
    definition and is drawn at the smallest KL of the figure's other stages (marked in the hover text).
    Example: `draw_lens_comparison({"logit lens": logit_lens(m, t), "tuned lens": tuned_lens(m, t, lens)})`
    """
    if not lenses:
        raise ValueError("lenses: expected at least one LensResult")
    stages = {tuple(r.labels[0]) for r in lenses.values()}
    if len(stages) != 1:
        raise ValueError(f"lenses: every result must have the same stages, got {sorted(stages)}")
    stage_names = list(next(iter(stages)))
    kls = {name: as_array(r.kl_to_final().values).mean(-1) for name, r in lenses.items()}
    positive = np.concatenate([k[k > 0] for k in kls.values()])
    floor = float(positive.min()) / 2 if positive.size else 1e-6
    fig = make_subplots(rows=1, cols=2, subplot_titles=["KL(final ‖ stage), nats", "log-prob of the next token"],
                        horizontal_spacing=0.14)
    for i, (name, result) in enumerate(lenses.items()):
        colour = SERIES[i % len(SERIES)]
        kl = kls[name]
        shown = np.where(kl > 0, kl, floor)
        text = [f"{v:.4g}" if v > 0 else "0 (drawn at the axis floor)" for v in kl]
        fig.add_trace(go.Scatter(x=stage_names, y=shown, mode="lines+markers", name=name, legendgroup=name,
                                 line={"color": colour}, customdata=text,
                                 hovertemplate=f"{name}<br>%{{x}}: KL %{{customdata}} nats<extra></extra>"),
                      row=1, col=1)
        logprob = as_array(result.values).mean(-1)
        fig.add_trace(go.Scatter(x=stage_names, y=logprob, mode="lines+markers", name=name, legendgroup=name,
                                 showlegend=False, line={"color": colour},
                                 hovertemplate=f"{name}<br>%{{x}}: %{{y:.4f}} nats<extra></extra>"), row=1, col=2)
    fig.update_yaxes(type="log", title={"text": "mean KL to the final layer (nats)"}, row=1, col=1)
    fig.update_yaxes(title={"text": "mean log-prob (nats)"}, row=1, col=2)
    fig.update_xaxes(title={"text": "stage (residual stream read)"})
    fig.update_layout(template=TEMPLATE, title={"text": title}, height=440, width=980,
                      margin={"t": 110})
    return fig
