"""The model zoo: small attention-only checkpoints shipped in the package, each with a measured model card.

`load_pretrained(name)` loads a checkpoint from `circuits/models/zoo/<name>/` (weights, config, tokenizer
where there is one); `model_card(name)` returns its card as a dict; `available()` lists the names.
Each checkpoint is regenerated, bit for bit on the same machine, by one command:

    python -m circuits.models.zoo --name attn2l-induction      # or --all

The recipes (data, model shape, training settings, what the card measures) are in `zoo_recipes`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformer_lens import TransformerBridge

from circuits.models.io import load

ZOO_DIR = Path(__file__).parent / "zoo"
CARD = "card.json"
NAMES = ("attn0l-bigram", "attn1l-skiptrigram", "attn2l-induction", "attn2l-pycode")


def available() -> list[str]:
    """Names of the checkpoints present in the zoo. Example: `"attn2l-induction" in available()`"""
    return [name for name in NAMES if (ZOO_DIR / name / CARD).is_file()]


def zoo_path(name: str) -> Path:
    """The folder of checkpoint `name`; a clear error for an unknown or missing name."""
    if name not in NAMES:
        raise ValueError(f"name: unknown zoo model {name!r}; expected one of {list(NAMES)}")
    folder = ZOO_DIR / name
    if not (folder / CARD).is_file():
        raise FileNotFoundError(
            f"zoo model {name!r} is not in {ZOO_DIR}; regenerate it with `python -m circuits.models.zoo --name {name}`"
        )
    return folder


def load_pretrained(name: str) -> TransformerBridge:
    """Load zoo model `name` (eval mode, CPU). `model.zoo_name` is set; `model.bpe` is its tokenizer if any.

    Example: `model = load_pretrained("attn2l-induction")`
    """
    model = load(zoo_path(name))
    model.zoo_name = name
    return model


def model_card(name: str) -> dict:
    """The model card of zoo model `name`: data, training settings, losses and measured contents.

    The 1- and 2-layer cards have "previous_token_heads" and "induction_heads" ([[layer, head], ...]).
    Example: `model_card("attn2l-induction")["induction_heads"]`
    """
    return json.loads((zoo_path(name) / CARD).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circuits.models.zoo", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--name", choices=NAMES, help="regenerate one checkpoint")
    group.add_argument("--all", action="store_true", help="regenerate every checkpoint")
    group.add_argument("--card", choices=NAMES, help="print a checkpoint's card")
    parser.add_argument("--out", type=Path, default=ZOO_DIR, help="folder to write <name>/ into (default: the zoo)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.card:
        print(json.dumps(model_card(args.card), indent=2))
        return 0
    from circuits.models.zoo_recipes import regenerate

    for name in NAMES if args.all else [args.name]:
        card = regenerate(name, args.out, progress=not args.quiet)
        print(f"{name}: wrote {args.out / name} (final train loss {card['final_train_loss']:.4f}, "
              f"held-out loss {card['heldout_loss']:.4f}, {card['training']['train_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
