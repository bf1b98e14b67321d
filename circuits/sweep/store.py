"""The results folder: one JSON file per finished run, keyed by a hash of the run's full configuration.

Layout: `<root>/runs/<key>.json`. Each entry holds the run's configuration, its status ("ok" or "error"),
the circuit (`Circuit.to_json`), scores, metrics, timings, peak memory, and a SHA-256 checksum of all of
it. Writes are atomic: the entry goes to a temporary file with a unique name in the same folder, is
flushed to disk, then published under its final name with `os.link` (which fails if the name exists) or,
over a corrupt entry, `os.replace`. So a reader sees a whole entry or none; a process killed mid-write
leaves only a temporary file (removed by the next sweep on this host once its writer is dead); and two
sweeps sharing a folder never mix their bytes: when both finish the same run, the first entry stays. An
entry that fails to parse, whose checksum or key does not match, is reported as absent and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuits.digest import canonical_json, entry_checksum, write_synced

FORMAT = 1
TMP_PREFIX = ".tmp."


def run_key(identity: dict[str, Any]) -> str:
    """The 64-hex-digit key of a run: SHA-256 of its identity's canonical JSON."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


@dataclass(frozen=True)
class Store:
    """A results folder. Example: `Store("out/sweep").read(key)` is the entry dict, or None if absent/corrupt."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def path(self, key: str) -> Path:
        return self.runs / f"{key}.json"

    def read(self, key: str) -> dict[str, Any] | None:
        """The valid entry for `key`, or None when there is none or it is corrupt (unparsable, partial,
        its checksum or key not matching)."""
        try:
            text = self.path(key).read_text()
            entry = json.loads(text)
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
            return None
        if entry.get("checksum") != entry_checksum(entry):
            return None
        if run_key(entry.get("identity")) != key:
            return None
        return entry

    def write(self, entry: dict[str, Any]) -> bool:
        """Publish `entry` (its `key`, `identity` and the rest) atomically; adds `format` and `checksum`.
        Returns False if a valid entry for the key was already there (it is kept)."""
        key = entry["key"]
        if run_key(entry["identity"]) != key:
            raise ValueError("entry: its key is not the hash of its identity")
        entry = {**entry, "format": FORMAT}
        entry["checksum"] = entry_checksum(entry)
        self.runs.mkdir(parents=True, exist_ok=True)
        tmp = self.runs / f"{TMP_PREFIX}{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}"
        try:
            write_synced(tmp, (json.dumps(entry, allow_nan=True) + "\n").encode())
            return self._publish(tmp, key)
        finally:
            tmp.unlink(missing_ok=True)

    def _publish(self, tmp: Path, key: str) -> bool:
        final = self.path(key)
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            if self.read(key) is not None:
                return False
            os.replace(tmp, final)  # over a corrupt or partial entry
            return True
        except OSError:  # a filesystem without hard links: rename (atomic, last writer wins)
            os.replace(tmp, final)
            return True

    def keys(self) -> list[str]:
        """The keys of every entry file (valid or not) in the folder."""
        if not self.runs.is_dir():
            return []
        return sorted(p.stem for p in self.runs.glob("*.json") if not p.name.startswith("."))

    def remove_stale_temporaries(self) -> int:
        """Remove temporary files left on this host by writers that are no longer running; returns how many."""
        if not self.runs.is_dir():
            return 0
        host, removed = socket.gethostname(), 0
        for p in self.runs.glob(f"{TMP_PREFIX}*"):
            parts = p.name[len(TMP_PREFIX):].split(".")
            if len(parts) < 4:
                continue
            tmp_host, pid = ".".join(parts[1:-2]), parts[-2]
            if tmp_host == host and pid.isdigit() and not _alive(int(pid)):
                p.unlink(missing_ok=True)
                removed += 1
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
