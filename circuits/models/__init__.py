"""Building, training, saving and loading models; the shipped zoo; the hand-built planted model."""

from circuits.models.build import ModelSpec, attn_only, build, has_layernorm, is_attn_only, spec_of
from circuits.models.io import load, save
from circuits.models.planted import PlantedHeads, planted_induction
from circuits.models.tokenizer import BPETokenizer
from circuits.models.train import TrainLog, next_token_loss, train

__all__ = [
    "BPETokenizer", "ModelSpec", "PlantedHeads", "planted_induction", "TrainLog", "attn_only", "build",
    "has_layernorm", "is_attn_only",
    "load", "next_token_loss", "save", "spec_of", "train",
]
