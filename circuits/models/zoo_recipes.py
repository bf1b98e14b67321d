"""How a zoo checkpoint is made: its data, shape, training settings, and the measurements on its card.

The recipes themselves are in `zoo_synthetic` and `zoo_pycode` (which import this module, never the reverse);
`circuits.models.zoo.recipe(name)` finds one by name. `regenerate(recipe, out_dir)` trains from scratch with
fixed seeds and a fixed number of torch threads (so that the same machine gives the same weights), measures
the model on held-out data, and writes model.safetensors, config.json (and tokenizer.json), card.json and
card.md into `out_dir/name`.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformer_lens import TransformerBridge

from circuits.models.build import ModelSpec, build
from circuits.models.io import save
from circuits.models.train import DataSource, train

HEAD_THRESHOLD = 0.4  # a head "is" a previous-token / induction head when its attention score exceeds this
HELDOUT_SEED = 1234  # held-out data is drawn from a generator seeded apart from training


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a zoo checkpoint. `make_data()` returns (training data, tokenizer or None)."""

    name: str
    summary: str
    spec: ModelSpec
    steps: int
    lr: float
    batch_size: int
    make_data: Callable[[], tuple[DataSource, object]]
    measure: Callable[[TransformerBridge], dict]
    data: dict
    seed: int = 0
    weight_decay: float = 0.0
    threads: int = 1
    notes: list[str] = field(default_factory=list)
    init: Callable[[TransformerBridge], None] | None = None
    """Run on the freshly built model before training (in place): a warm start of some weights, which the
    recipe's data description states."""
    extras: Callable[[TransformerBridge, Path], dict] | None = None
    """Run after the checkpoint is saved, with the model and its folder: writes further files there (a tuned
    lens) and returns more card fields (merged into the card, with "contains" lines appended)."""


def n_params(model: TransformerBridge) -> int:
    return sum(p.numel() for p in model.state_dict().values())


def regenerate(r: Recipe, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train the zoo model of recipe `r` from scratch, measure it, and write its folder under `out_dir`.

    Returns the card. Example: `regenerate(recipe("attn2l-induction"), "out/zoo")` (`circuits.models.zoo.recipe`)
    """
    name = r.name
    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    data, tokenizer = r.make_data()
    model = build(r.spec, seed=r.seed)
    if r.init is not None:
        r.init(model)
    if tokenizer is not None:
        model.bpe = tokenizer
    start = time.perf_counter()
    log = train(model, data, steps=r.steps, lr=r.lr, batch_size=r.batch_size, seed=r.seed,
                weight_decay=r.weight_decay, progress=progress)
    seconds = time.perf_counter() - start
    folder = Path(out_dir) / name
    save(model, folder)
    card = {
        "name": name,
        "summary": r.summary,
        "architecture": {**r.spec.to_dict(), "n_params": n_params(model), "attn_only": True},
        "data": r.data,
        "training": {
            "steps": r.steps, "lr": r.lr, "batch_size": r.batch_size, "seed": r.seed,
            "weight_decay": r.weight_decay,
            "optimizer": "AdamW(betas=(0.9, 0.98)), 5% linear warm-up, cosine to 0.1·lr",
            "torch_threads": r.threads, "train_seconds": round(seconds, 1),
            "machine": f"{platform.machine()} CPU, torch {torch.__version__}, python {sys.version.split()[0]}",
        },
        "final_train_loss": round(log.final_loss, 4),
        "final_train_loss_definition": "mean next-token loss (nats) over the last 5% of training steps",
    }
    return write_card(r, model, folder, card)


def remeasure(r: Recipe, out_dir: str | Path) -> dict:
    """Measure the saved checkpoint of recipe `r` again (its weights untouched) and rewrite its card, keeping the
    training record of the card already there: for a change in what a card measures, without retraining."""
    from circuits.models.io import load

    folder = Path(out_dir) / r.name
    old = json.loads((folder / "card.json").read_text())
    torch.set_num_threads(r.threads)
    model = load(folder)
    kept = ("architecture", "data", "training", "final_train_loss", "final_train_loss_definition")
    return write_card(r, model, folder, {"name": r.name, "summary": r.summary, **{k: old[k] for k in kept}})


def write_card(r: Recipe, model: TransformerBridge, folder: Path, card: dict) -> dict:
    """Measure `model` (the recipe's measure and extras) and write card.json and card.md into `folder`."""
    card = {**card, **r.measure(model)}
    if r.extras is not None:
        more = r.extras(model, folder)
        card = {**card, **more, "contains": card["contains"] + more.get("contains", [])}
    card = {**card, "notes": r.notes, "regenerate": f"python -m circuits.models.zoo --name {r.name}"}
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (folder / "card.md").write_text(card_markdown(card))
    return card


def card_markdown(card: dict) -> str:
    """The card as a short Markdown page (card.md)."""
    a, t = card["architecture"], card["training"]
    lines = [
        f"# {card['name']}", "", card["summary"], "",
        f"- **Shape**: {a['n_layers']} layers, {a['n_heads']} heads of {a['d_head']}, d_model {a['d_model']}, "
        f"d_vocab {a['d_vocab']}, n_ctx {a['n_ctx']}, LayerNorm {'yes' if a['layernorm'] else 'no'}, "
        f"attention-only, {a['n_params']:,} parameters",
        f"- **Data**: {card['data']['description']}",
        f"- **Training**: {t['steps']} steps, batch {t['batch_size']}, lr {t['lr']}, seed {t['seed']}, "
        f"weight decay {t['weight_decay']}, {t['optimizer']}; {t['train_seconds']} s on {t['machine']}, "
        f"{t['torch_threads']} torch thread(s)",
        f"- **Final training loss**: {card['final_train_loss']} ({card['final_train_loss_definition']})",
        f"- **Held-out loss**: {card['heldout_loss']} ({card['heldout_loss_definition']})",
        "", "## What it contains (measured)", "",
    ]
    lines += [f"- {item}" for item in card["contains"]]
    if card.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in card["notes"]]
    lines += ["", "## Regenerate", "", "```", card["regenerate"], "```", ""]
    return "\n".join(lines)


def head_measurements(model: TransformerBridge, tokens: torch.Tensor, half_len: int) -> dict:
    """Previous-token and induction attention scores of every head, and the heads above HEAD_THRESHOLD."""
    from circuits.models.head_scores import heads_above, induction_scores, previous_token_scores

    prev = previous_token_scores(model, tokens).values
    ind = induction_scores(model, tokens, half_len).values
    prev_heads, ind_heads = heads_above(prev, HEAD_THRESHOLD), heads_above(ind, HEAD_THRESHOLD)
    return {
        "previous_token_heads": [row[:2] for row in prev_heads],
        "induction_heads": [row[:2] for row in ind_heads],
        "previous_token_head_scores": prev_heads,
        "induction_head_scores": ind_heads,
        "head_score_threshold": HEAD_THRESHOLD,
        "head_scores": {
            "previous_token": [[round(float(x), 4) for x in row] for row in prev],
            "induction": [[round(float(x), 4) for x in row] for row in ind],
            "definition": "attention-pattern scores (circuits.models.head_scores): previous-token = mean attention "
            "from position i to i-1 (i >= 1); induction = mean attention from position T+k to k+1 (k = 1..T-1) "
            f"on [BOS, x, x] rows with |x| = T = {half_len}",
        },
    }
