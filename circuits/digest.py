"""SHA-256 digests of a model's weights, of a task's data and of a JSON entry: what identifies a run (a sweep's
key, an ACDC checkpoint's description) and what verifies a stored entry (its checksum); and the durable write of
such an entry's bytes (`write_synced`, `sync_folder`). Neutral ground, so that `graph` and `sweep` both use it
without importing each other."""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformer_lens import TransformerBridge

from circuits.tasks.task import Task


def weights_digest(model: TransformerBridge) -> str:
    """SHA-256 of every weight (names, shapes, dtypes and bytes) and the config: the model's part of a run's key.

    Every byte counts (unlike a sampled fingerprint), so a model differing in any weight gets other keys."""
    h = hashlib.sha256()
    h.update(repr(sorted(_config_items(model))).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def task_digest(task: Task) -> str:
    """SHA-256 of the task's data (tokens, answers, positions) and metric: the task's part of a run's key."""
    h = hashlib.sha256()
    h.update(f"{task.name}|{task.metric.value}".encode())
    for name in ("clean", "corrupted", "answers", "positions", "wrong_answers"):
        t = getattr(task, name)
        h.update(name.encode())
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _config_items(model: TransformerBridge) -> list[tuple[str, str]]:
    cfg = model.cfg
    names = ("n_layers", "n_heads", "d_model", "d_head", "d_vocab", "n_ctx", "attn_only", "act_fn",
             "normalization_type", "positional_embedding_type")
    return [(n, repr(getattr(cfg, n, None))) for n in names]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the text that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def entry_checksum(entry: dict[str, Any]) -> str:
    """SHA-256 of a stored JSON entry's canonical text, its own `checksum` field left out."""
    body = {k: v for k, v in entry.items() if k != "checksum"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist: a unique temporary name) holding `data`, flushed to disk before
    returning; the caller then publishes it under its final name (rename or link) and removes it on failure.
    Example: `write_synced(folder / f".{name}.{uuid4().hex}.tmp", entry_bytes)`"""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk, so that a rename or link into it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
