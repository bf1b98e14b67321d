"""The model zoo: small attention-only checkpoints shipped in the package, each with a measured model card.

`load_pretrained(name)` loads a checkpoint from `circuits/models/zoo/<name>/` (weights, config, tokenizer
where there is one); `model_card(name)` returns its card as a dict; `available()` lists the names.
Each checkpoint is regenerated, bit for bit on the same machine, by one command:

    python -m circuits.models.zoo --name attn2l-induction      # or --all

`--resave NAME` rewrites a present checkpoint in the current checkpoint format without retraining: it loads it,
saves it again, loads the new files with every check of `circuits.models.load` and requires the weights bit-equal.

The recipes (data, model shape, training settings, what the card measures) are in `zoo_synthetic` and
`zoo_pycode`, built on `zoo_recipes`; `recipe(name)` returns one.
`python -m circuits.models.zoo --table` prints a Markdown table of the available checkpoints, made from
their cards; `--readme PATH` (repeatable) also writes it between `<!-- zoo:start -->` and `<!-- zoo:end -->`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformer_lens import TransformerBridge

from circuits.markers import markers, rewrite_marked_block
from circuits.models.io import load, save

ZOO_DIR = Path(__file__).parent / "zoo"
CARD = "card.json"
NAMES = ("attn0l-bigram", "attn1l-skiptrigram", "attn2l-induction", "attn2l-pycode", "attn2l-pycode-induction")
START, END = markers("zoo")


def recipe(name: str):
    """The `zoo_recipes.Recipe` of zoo model `name`. Example: `recipe("attn2l-induction").steps`"""
    from circuits.models import zoo_pycode, zoo_synthetic

    recipes = {r.name: r for r in (zoo_synthetic.bigram_recipe(), zoo_synthetic.skip_trigram_recipe(),
                                   zoo_synthetic.induction_recipe(), zoo_pycode.pycode_recipe(),
                                   zoo_pycode.pycode_induction_recipe())}
    if name not in recipes:
        raise ValueError(f"name: no recipe for {name!r}; expected one of {sorted(recipes)}")
    return recipes[name]


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


def resave(name: str, out_dir: Path = ZOO_DIR) -> Path:
    """Rewrite checkpoint `name` under `out_dir` in the current format (weights, tokenizer and card untouched);
    raises unless the re-saved checkpoint loads, verified, to bit-equal weights."""
    import warnings

    folder = Path(out_dir) / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an older format is what is being rewritten
        model = load(folder)
    save(model, folder)
    again = load(folder)
    before, after = model.state_dict(), again.state_dict()
    if set(before) != set(after) or any(not torch.equal(before[k], after[k]) for k in before):
        raise RuntimeError(f"{folder}: the re-saved weights differ from the loaded ones")
    return folder


def model_card(name: str) -> dict:
    """The model card of zoo model `name`: data, training settings, losses and measured contents.

    The 1- and 2-layer cards have "previous_token_heads" and "induction_heads" ([[layer, head], ...]).
    Example: `model_card("attn2l-induction")["induction_heads"]`
    """
    return json.loads((zoo_path(name) / CARD).read_text())


def _heads(rows: list) -> str:
    return ", ".join(f"L{row[0]}H{row[1]}" for row in rows)


def card_contents(card: dict) -> str:
    """What a card says the model contains, in one short line (from the card's measured fields)."""
    m = card.get("measurements", {})
    parts = []
    if "bigram_correlation" in m:
        parts.append(f"direct path W_E·W_U vs log transition: r = {m['bigram_correlation']:.4f}")
    if "kl_to_chain" in m:
        parts.append(f"KL to the chain {m['kl_to_chain']:.4f}")
    if "completion_accuracy" in m:
        parts.append(f"skip-trigram A…B→C completion accuracy {m['completion_accuracy']:.4f}")
    if card.get("skip_trigram_heads"):
        parts.append(f"B→A heads {_heads(card['skip_trigram_heads'])}")
    if card.get("previous_token_heads"):
        parts.append(f"previous-token heads {_heads(card['previous_token_heads'])}")
    if card.get("induction_heads"):
        parts.append(f"induction heads {_heads(card['induction_heads'])}")
    if "second_copy_accuracy" in m:
        parts.append(f"second-copy top-1 accuracy {m['second_copy_accuracy']:.4f}")
    if card["architecture"]["n_layers"] >= 2 and not card.get("induction_heads") and "head_score_threshold" in card:
        parts.append(f"no induction head scores above {card['head_score_threshold']}")
    shifted = m.get("attention_shapes", {}).get("repeated_random_tokens", {}).get("heads", {})
    if not card.get("induction_heads") and shifted:
        name, h = max(((n, h) for n, h in shifted.items() if n.startswith("L1")),
                      key=lambda item: item[1]["best_two_lags_score"])
        low, high = h["best_two_lags"]
        parts.append(f"shifted induction instead: {name} attends from T+k to k+1+d, d = {low}–{high} "
                     f"({h['best_two_lags_score']:.3f} of its attention on repeated random tokens)")
    if "in_context_drop" in m:
        parts.append(f"in-context loss drop {m['in_context_drop']:.4f} nats on repeated held-out code")
    return "; ".join(parts) or "-"


def table_markdown(names: list[str] | None = None) -> str:
    """A Markdown table of the checkpoints `names` (default: every available one), made from their cards."""
    names = available() if names is None else names
    lines = [
        "| model | layers × heads | d_model | vocab | params | steps | train s | held-out loss | contains (measured) |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name in names:
        card = model_card(name)
        a, t = card["architecture"], card["training"]
        shape = f"{a['n_layers']} × {a['n_heads']}" if a["n_layers"] else "0 (embed → unembed)"
        lines.append(
            f"| `{name}` | {shape} | {a['d_model']} | {a['d_vocab']} | {a['n_params']:,} | {t['steps']:,} "
            f"| {t['train_seconds']:.1f} | {card['heldout_loss']:.4f} | {card_contents(card)} |"
        )
    if not names:
        lines.append("| (no checkpoint present) | | | | | | | | |")
    return "\n".join(lines)


def table_block(names: list[str] | None = None) -> str:
    """The table and a note on where it comes from: what `--readme` writes between the markers."""
    return (
        table_markdown(names)
        + "\n\nHeld-out loss in nats per token, each on the held-out set its card defines. Written by "
        "`python -m circuits.models.zoo --table --readme README.md --readme docs/zoo.md` from the cards."
    )


def rewrite_block(path: str | Path, block: str) -> bool:
    """Replace the zoo block of file `path` by `block` (see `circuits.markers`); returns whether it changed."""
    return rewrite_marked_block(path, "zoo", block)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circuits.models.zoo", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--name", choices=NAMES, help="regenerate one checkpoint")
    group.add_argument("--all", action="store_true", help="regenerate every checkpoint")
    group.add_argument("--remeasure", choices=NAMES, help="measure a present checkpoint again and rewrite its card "
                       "(the weights and the card's training record are kept)")
    group.add_argument("--card", choices=NAMES, help="print a checkpoint's card")
    group.add_argument("--resave", choices=NAMES, help="rewrite a present checkpoint in the current format, verified")
    group.add_argument("--table", action="store_true", help="print a Markdown table of the available checkpoints")
    parser.add_argument("--readme", type=Path, action="append", default=[], metavar="PATH",
                        help=f"with --table: also write the table between {START} and {END} in PATH (repeatable)")
    parser.add_argument("--out", type=Path, default=ZOO_DIR, help="folder to write <name>/ into (default: the zoo)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.readme and not args.table:
        parser.error("--readme: only with --table")
    if args.table:
        block = table_block()
        print(block)
        for path in args.readme:
            changed = rewrite_block(path, block)
            print(f"{path}: {'rewritten' if changed else 'unchanged'}", file=sys.stderr)
        return 0
    if args.resave:
        print(f"{args.resave}: rewrote {resave(args.resave, args.out)} in the current checkpoint format")
        return 0
    if args.card:
        print(json.dumps(model_card(args.card), indent=2))
        return 0
    from circuits.models.zoo_recipes import regenerate, remeasure

    if args.remeasure:
        card = remeasure(recipe(args.remeasure), args.out)
        print(f"{args.remeasure}: rewrote {args.out / args.remeasure / CARD} "
              f"(held-out loss {card['heldout_loss']:.4f})")
        return 0

    for name in NAMES if args.all else [args.name]:
        card = regenerate(recipe(name), args.out, progress=not args.quiet)
        print(f"{name}: wrote {args.out / name} (final train loss {card['final_train_loss']:.4f}, "
              f"held-out loss {card['heldout_loss']:.4f}, {card['training']['train_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
