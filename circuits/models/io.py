"""Saving and loading models as checkpoints that verify themselves: safetensors weights, a JSON config, the tokenizer.

A checkpoint folder holds `model.safetensors` and `config.json` (and `tokenizer.json` for a `BPETokenizer`, or
`hf_tokenizer/` for a Hugging Face tokenizer). The config records how to rebuild the model (a native bridge's
config, or a Hugging Face bridge's `transformers` config and architecture name), the SHA-256 of the weights
file, the weights' dtype, the names that alias one tensor (tied embeddings; q, k and v split from one fused
matrix), and a probe: the logits of a fixed short input. `load` checks, in order: the format version is one it
knows; the weights file's SHA-256; every weight finite; the tensor names and shapes the config implies; and
that the rebuilt model's probe logits equal the recorded ones (so a config that describes another model with
the same shapes, say 8 heads of 8 for 4 of 16, is refused). `save` refuses non-finite weights and writes
through a temporary folder, so a failed save leaves nothing behind. Every error names the file and the problem.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import TransformerBridge
from transformer_lens.config import TransformerBridgeConfig

from circuits.models.build import ModelSpec, build
from circuits.models.tokenizer import BPETokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
HF_TOKENIZER = "hf_tokenizer"
FORMAT_VERSION = 2
KNOWN_VERSIONS = (1, 2)  # 1: spec and weights only (nothing verified but shapes); still read, with a warning
NATIVE = "TransformerLensNative"
PROBE_POSITIONS, PROBE_COLUMNS = 8, 32
# the probe logits are recomputed on load: float rounding may differ between machines, a different model does not
PROBE_RTOL = 1e-4


def save(model: TransformerBridge, path: str | Path) -> Path:
    """Save `model` to the folder `path` (created; files of an older checkpoint there are replaced). Returns it.

    Works for native bridges (any normalisation, attention-only or with MLPs, 0 layers included) and for bridges
    of Hugging Face models (`boot_transformers`; tied and fused weights are stored once). The round trip
    through `load` is bit-exact. Raises ValueError, writing nothing, when a weight is NaN or infinite.
    Example: `save(model, "out/my-model")`
    """
    path = Path(path)
    state, aliases = _unique_state(model)
    _check_finite(state, f"model (saving to {path})")
    config = {"format_version": FORMAT_VERSION, **_describe(model), "dtype": _dtype_name(state),
              "aliases": aliases, "probe": _probe(model)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config["weights_sha256"] = _sha256(tmp / WEIGHTS)
        written = [WEIGHTS, CONFIG]
        bpe = getattr(model, "bpe", None)
        if bpe is not None:
            bpe.save(tmp / TOKENIZER)
            config["tokenizer"] = TOKENIZER
            written.append(TOKENIZER)
        elif config["kind"] == "transformers" and getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save_pretrained(str(tmp / HF_TOKENIZER))
            config["tokenizer"] = HF_TOKENIZER
            written.append(HF_TOKENIZER)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        path.mkdir(exist_ok=True)
        for name in (TOKENIZER, HF_TOKENIZER):  # a tokenizer of the checkpoint this one replaces
            if name not in written and (path / name).exists():
                shutil.rmtree(path / name) if (path / name).is_dir() else (path / name).unlink()
        for name in written:
            if (path / name).is_dir():
                shutil.rmtree(path / name)
            (tmp / name).replace(path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load(path: str | Path) -> TransformerBridge:
    """Load a model saved by `save`, verifying it (see the module docstring). Errors name the file and what is
    wrong with it. Example: `model = load("out/my-model")`
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    config = _read_config(path / CONFIG)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    version = config["format_version"]
    if version >= 2:
        digest = _sha256(weights)
        if digest != config.get("weights_sha256"):
            raise ValueError(f"{weights}: SHA-256 {digest} differs from the {config.get('weights_sha256')} recorded "
                             f"in {CONFIG}: the file was changed or damaged after it was saved")
    else:
        warnings.warn(f"{path / CONFIG}: format_version 1 records no checksum or probe, so only tensor shapes are "
                      "checked; save the model again to write a verified checkpoint", UserWarning, stacklevel=2)
    state = _read_weights(weights)
    _check_finite(state, str(weights))
    for alias, target in config.get("aliases", {}).items():
        if target not in state:
            raise ValueError(f"{path / CONFIG}: alias {alias!r} names {target!r}, which {WEIGHTS} does not hold")
        state[alias] = state[target]
    model = _rebuild(config, path)
    _load_state(model, state, path)
    if version >= 2:
        _check_probe(model, config, path)
    return model


def _describe(model: TransformerBridge) -> dict:
    """How to rebuild `model`'s architecture: a native bridge's config (and our ModelSpec, where there is one), or
    a Hugging Face bridge's architecture name and `transformers` config."""
    cfg = model.cfg
    if getattr(cfg, "architecture", None) == NATIVE:
        out = {"kind": "native", "bridge_config": _native_config(cfg)}
        spec = getattr(model, "spec", None)
        if isinstance(spec, ModelSpec):
            out["spec"] = spec.to_dict()
        return out
    hf = getattr(model, "original_model", None)
    if hf is None or not hasattr(hf, "config"):
        raise ValueError(f"model: cannot save a {type(model).__name__} of architecture {cfg.architecture!r}: it is "
                         "neither a native bridge nor a bridge of a Hugging Face model")
    return {"kind": "transformers", "model_name": str(getattr(cfg, "model_name", cfg.architecture)),
            "hf_config": hf.config.to_dict()}


def _native_config(cfg: TransformerBridgeConfig) -> dict:
    """The arguments that recreate a native bridge's config (JSON values only; dtype by name; device left out)."""
    out = {}
    names = {n for klass in TransformerBridgeConfig.__mro__ if "__init__" in vars(klass) and klass is not object
             for n in inspect.signature(klass.__init__).parameters} - {"self", "kwargs", "args"}
    for name in sorted(names):  # d_mlp and others reach the base class's __init__ through **kwargs
        if name in ("device", "n_devices") or not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        if isinstance(value, float):
            value = float(value)  # numpy floats print as np.float64(...) in repr but are JSON numbers
        if value is None or isinstance(value, (bool, int, float, str)) or (
                isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)):
            out[name] = value
    return out


def _unique_state(model: TransformerBridge) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with each tensor stored once: a name whose tensor is exactly another's (same memory, shape
    and strides: tied weights) becomes an alias of the first; the rest are copied out of shared memory (q, k and v
    views of one fused matrix), which safetensors refuses."""
    state, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        state[name] = t.to("cpu", copy=True).contiguous()
    return state, aliases


def _dtype_name(state: dict[str, Tensor]) -> str:
    floats = {str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()}
    if len(floats) > 1:
        raise ValueError(f"model: weights in several dtypes {sorted(floats)}; cast the model to one before saving")
    return floats.pop() if floats else "float32"


def _check_finite(state: dict[str, Tensor], where: str) -> None:
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{where}: weights {bad[:5]}{' …' if len(bad) > 5 else ''} hold NaN or infinite values")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _probe_tokens(d_vocab: int, n_ctx: int) -> Tensor:
    n = min(PROBE_POSITIONS, n_ctx)
    return ((torch.arange(n) * 7 + 3) % d_vocab)[None]


def _probe(model: TransformerBridge) -> dict:
    """The logits of a fixed input: the first columns at every probe position and each position's logsumexp
    (which reads every column)."""
    tokens = _probe_tokens(int(model.cfg.d_vocab), int(model.cfg.n_ctx))
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(tokens.to(device))[0].double().cpu()
    return {"tokens": tokens[0].tolist(), "logits": logits[:, :PROBE_COLUMNS].tolist(),
            "logsumexp": logits.logsumexp(-1).tolist()}


def _check_probe(model: TransformerBridge, config: dict, path: Path) -> None:
    probe = config.get("probe")
    if not isinstance(probe, dict) or "logits" not in probe:
        raise ValueError(f"{path / CONFIG}: no probe logits recorded; the checkpoint cannot be verified")
    got = _probe(model)
    if got["tokens"] != probe["tokens"]:
        raise ValueError(f"{path / CONFIG}: the probe input {probe['tokens']} does not fit the model it describes "
                         f"(d_vocab {model.cfg.d_vocab}, n_ctx {model.cfg.n_ctx})")
    for key in ("logits", "logsumexp"):
        want, have = torch.tensor(probe[key], dtype=torch.float64), torch.tensor(got[key], dtype=torch.float64)
        scale = 1.0 + float(want.abs().max())
        err = float((want - have).abs().max()) if want.shape == have.shape else float("inf")
        if err > PROBE_RTOL * scale:
            raise ValueError(f"{path}: the model that {CONFIG} describes computes other logits from {WEIGHTS} than "
                             f"the saved model did (probe {key} off by {err:.3g}): the config does not match the "
                             "weights (a changed head count, normalisation or activation, say)")


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"config file {file} is not a valid model config: expected a JSON object")
    version = config.get("format_version")
    if isinstance(version, bool) or version not in KNOWN_VERSIONS:
        raise ValueError(f"config file {file}: format_version {version!r} is unknown; this version of circuits "
                         f"reads {list(KNOWN_VERSIONS)}")
    if version == 1:
        config["kind"] = "native"
    if config.get("kind") not in ("native", "transformers"):
        raise ValueError(f"config file {file}: kind {config.get('kind')!r}, expected 'native' or 'transformers'")
    return config


def _read_weights(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"weights file {file} is truncated or not a safetensors file: {err}") from err


def _rebuild(config: dict, path: Path) -> TransformerBridge:
    file = path / CONFIG
    try:
        if config["kind"] == "transformers":
            return _rebuild_transformers(config, path)
        if "spec" in config:  # built by circuits.models.build: rebuild the same way (model.spec is set)
            model = build(ModelSpec.from_dict(config["spec"]))
            _check_same_config(model, config.get("bridge_config"), file)
        else:
            model = _rebuild_native(config["bridge_config"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"config file {file} is not a valid model config: {err}") from err
    return _cast(model, config)


def _check_same_config(model: TransformerBridge, recorded: dict | None, file: Path) -> None:
    """The spec's model has the bridge config recorded beside it (the seed of its random init aside)."""
    if recorded is None:
        return
    built = _native_config(model.cfg)
    keys = (set(built) | set(recorded)) - {"seed", "dtype"}
    differ = sorted(k for k in keys if built.get(k) != recorded.get(k))
    if differ:
        raise ValueError(f"config file {file}: spec and bridge_config describe different models (they differ in "
                         f"{differ})")


def _rebuild_native(fields: dict) -> TransformerBridge:
    fields = dict(fields)
    if "dtype" in fields:
        fields["dtype"] = getattr(torch, fields["dtype"])
    n_layers = fields["n_layers"]
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**{**fields, "n_layers": max(1, n_layers)}))
    if n_layers == 0:
        from circuits.models.build import _strip_blocks

        _strip_blocks(model)
    return model.eval()


def _rebuild_transformers(config: dict, path: Path) -> TransformerBridge:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_config = dict(config["hf_config"])
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)).eval()
    tokenizer = None
    if config.get("tokenizer") == HF_TOKENIZER:
        tokenizer = AutoTokenizer.from_pretrained(str(path / HF_TOKENIZER), local_files_only=True)
        tokenizer.init_kwargs["name_or_path"] = config["model_name"]  # else the bridge looks for it on the hub
        tokenizer.init_kwargs.setdefault("add_bos_token", True)
    model = TransformerBridge.boot_transformers(config["model_name"], hf_model=hf, tokenizer=tokenizer)
    model.eval()
    return _cast(model, config)


def _cast(model: TransformerBridge, config: dict) -> TransformerBridge:
    """The model in the checkpoint's dtype (cast only when it differs: the bridge reports a cast)."""
    dtype = getattr(torch, config.get("dtype", "float32"))
    if next(model.parameters()).dtype != dtype:
        with contextlib.redirect_stdout(io.StringIO()):  # the bridge prints a line when its dtype changes
            model = model.to(dtype)
    return model


def _load_state(model: TransformerBridge, state: dict[str, Tensor], path: Path) -> None:
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
        if tensor.dtype != expected[name].dtype:
            raise ValueError(f"{path / WEIGHTS}: tensor {name!r} is {tensor.dtype}, {CONFIG} implies "
                             f"{expected[name].dtype}")
    model.load_state_dict(state, strict=True)
    if (path / TOKENIZER).exists():
        model.bpe = BPETokenizer.load(path / TOKENIZER)
