"""Saving and loading models: safetensors weights, a JSON config, and the tokenizer where there is one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens import TransformerBridge

from circuits.models.build import ModelSpec, build, spec_of
from circuits.models.tokenizer import BPETokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 1


def save(model: TransformerBridge, path: str | Path) -> Path:
    """Save `model` to the folder `path` (created): weights, config and tokenizer. Returns the folder.

    The round trip through `load` is bit-exact. Example: `save(model, "out/my-model")`
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    config = {"format_version": FORMAT_VERSION, "spec": spec_of(model).to_dict()}
    tokenizer = getattr(model, "bpe", None)
    if tokenizer is not None:
        tokenizer.save(path / TOKENIZER)
        config["tokenizer"] = TOKENIZER
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load(path: str | Path) -> TransformerBridge:
    """Load a model saved by `save`. Errors name the file and what is wrong with it.

    Example: `model = load("out/my-model")`
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    spec = _read_spec(path / CONFIG)
    state = _read_weights(path / WEIGHTS)
    model = build(spec)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{path / WEIGHTS}: does not match {CONFIG}: missing {missing}, unexpected {extra}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{path / WEIGHTS}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"{CONFIG} implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    if (path / TOKENIZER).exists():
        model.bpe = BPETokenizer.load(path / TOKENIZER)
    return model


def _read_spec(file: Path) -> ModelSpec:
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    try:
        config = json.loads(file.read_text())
        return ModelSpec.from_dict(config["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"config file {file} is not a valid model config: {err}") from err


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"weights file {file} does not exist")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"weights file {file} is truncated or not a safetensors file: {err}") from err
