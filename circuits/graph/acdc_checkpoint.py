"""ACDC's checkpoint file: the walk's state after each destination, so that a run that dies resumes where it was.

One JSON file: `format`, `description` (what makes two runs the same run: the SHA-256 of the model's weights
and of the task's data, the metric, ablation, threshold, order and the graph's size), `state` (how many
destinations of the walk are done, the mask, the scores, the loss, the guesses kept for the next destination
and the cost so far) and `checksum` (SHA-256 of the rest). It is replaced atomically: written to a temporary
file in the same folder, flushed to disk, renamed over the old one, and the folder synced; so a process killed
at any moment leaves the previous checkpoint or the new one, never a mix. A file whose checksum does not match,
or whose description is another run's, is refused with an error naming the difference (never silently
restarted or overwritten). The circuit's run itself (every node's output, hundreds of MiB at GPT-2 scale) is not
stored: a resumed walk recomputes it from the mask by one patched forward.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.digest import entry_checksum, sync_folder, task_digest, weights_digest, write_synced

FORMAT = 1


def run_description(model: Any, task: Any, **settings: Any) -> dict[str, Any]:
    """What identifies an ACDC run: the weights' and the task's digests and the settings that change decisions.
    Example: `run_description(model, task, metric="kl", ablation="resample", threshold=0.01, order="latest_first")`
    """
    return dict(method="acdc", weights_sha256=weights_digest(model), task_sha256=task_digest(task), **settings)


def write_checkpoint(path: str | os.PathLike[str], description: dict[str, Any], state: dict[str, Any]) -> None:
    """Replace the checkpoint at `path` by this one, atomically (temporary file, fsync, rename, folder fsync)."""
    path = Path(path)
    entry: dict[str, Any] = dict(format=FORMAT, description=description, state=state)
    entry["checksum"] = entry_checksum(entry)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write_synced(tmp, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)  # the rename itself survives a crash


def read_checkpoint(path: str | os.PathLike[str], description: dict[str, Any]) -> dict[str, Any] | None:
    """The state stored at `path`, or None when there is no file. Raises ValueError when the file is damaged
    or belongs to another run (naming what differs)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: unreadable ({e}); delete it to start afresh") from None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("checksum") != entry_checksum(entry):
        raise ValueError(f"checkpoint {str(path)!r}: not an ACDC checkpoint of format {FORMAT}, or damaged (its "
                         "checksum does not match); delete it to start afresh")
    theirs = entry["description"]
    differs = sorted(k for k in set(theirs) | set(description) if theirs.get(k) != description.get(k))
    if differs:
        detail = "; ".join(f"{k}: file {theirs.get(k)!r}, this run {description.get(k)!r}" for k in differs)
        raise ValueError(f"checkpoint {str(path)!r} belongs to another run ({detail}); pass another path or "
                         "delete it")
    return entry["state"]


def encode_mask(mask: Bool[Tensor, "n_src n_dst"]) -> dict[str, Any]:
    """A bool matrix as JSON (packed bits, base64)."""
    bits = np.packbits(mask.cpu().numpy().reshape(-1))
    return dict(shape=list(mask.shape), bits=base64.b64encode(bits.tobytes()).decode())


def decode_mask(value: dict[str, Any]) -> Bool[Tensor, "n_src n_dst"]:
    shape = tuple(value["shape"])
    bits = np.frombuffer(base64.b64decode(value["bits"]), dtype=np.uint8)
    flat = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool)
    return torch.from_numpy(flat.reshape(shape).copy())


def encode_values(values: Float[Tensor, "..."]) -> dict[str, Any]:
    """A float tensor as JSON, bit for bit (its bytes, base64; NaN kept)."""
    array = values.detach().cpu().contiguous().numpy()
    return dict(shape=list(array.shape), dtype=str(array.dtype), data=base64.b64encode(array.tobytes()).decode())


def decode_values(value: dict[str, Any]) -> Float[Tensor, "..."]:
    array = np.frombuffer(base64.b64decode(value["data"]), dtype=np.dtype(value["dtype"]))
    return torch.from_numpy(array.reshape(tuple(value["shape"])).copy())
