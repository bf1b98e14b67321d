"""Building, training, saving and loading models; the shipped zoo; the hand-built planted model."""

from typing import TYPE_CHECKING

from circuits.models.build import ModelSpec, attn_only, build, has_layernorm, is_attn_only, spec_of
from circuits.models.gpt2 import random_gpt2
from circuits.models.io import load, save
from circuits.models.planted import PlantedHeads, planted_induction
from circuits.models.random_hf import random_gemma, random_llama, random_mistral, random_neox, random_qwen2
from circuits.models.tokenizer import BPETokenizer
from circuits.models.tracr import compile_program, from_tracr
from circuits.models.train import TrainLog, next_token_loss, train

# The zoo's functions are exported lazily (PEP 562): importing circuits.models.zoo here would make
# `python -m circuits.models.zoo` warn that the module was imported before it ran.
if TYPE_CHECKING:  # for type checkers and the docs (griffe reads this block)
    from circuits.models.zoo import available, load_pretrained, model_card

_ZOO_EXPORTS = ("available", "load_pretrained", "model_card")


def __getattr__(name: str):
    if name in _ZOO_EXPORTS:
        from circuits.models import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ZOO_EXPORTS))


__all__ = [
    "BPETokenizer", "ModelSpec", "PlantedHeads", "planted_induction", "TrainLog", "attn_only", "build",
    "has_layernorm", "is_attn_only",
    "load", "next_token_loss", "random_gemma", "random_gpt2", "random_llama", "random_mistral", "random_neox",
    "random_qwen2",
    "save", "spec_of", "train", "compile_program", "from_tracr",
    "available", "load_pretrained", "model_card",
]
