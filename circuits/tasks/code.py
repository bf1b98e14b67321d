"""Real Python code: the standard library's own source on this machine, a fixed held-out split, and the
induction task on repeated held-out code.

The corpus is every `.py` file under the running interpreter's stdlib folder
(`sysconfig.get_paths()["stdlib"]`), minus tests, site-packages and generated tables (see `EXCLUDED_DIRS`),
in sorted order. The modules in `HELDOUT_MODULES` are never trained on.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from circuits.tasks.induction import _random_other_tokens, second_half_positions
from circuits.tasks.task import Metric, Task

HELDOUT_MODULES: tuple[str, ...] = (
    "argparse.py", "bisect.py", "csv.py", "difflib.py", "fractions.py", "heapq.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "shlex.py", "statistics.py", "string.py", "textwrap.py",
)
"""Stdlib files (paths relative to the stdlib folder) held out from training, for every real-text model."""

EXCLUDED_DIRS: frozenset[str] = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data",
     "lib2to3", "ensurepip", "config-3.10", "config-3.11", "config-3.12", "config-3.13"}
)
"""Folders whose files are not part of the corpus: tests, installed packages, generated tables."""


@dataclass(frozen=True)
class CodeCorpus:
    """The stdlib source split into training and held-out files (paths relative to `root`, sorted)."""

    root: Path
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]

    def train_texts(self) -> list[str]:
        return [_read(self.root / f) for f in self.train_files]

    def heldout_texts(self) -> list[str]:
        return [_read(self.root / f) for f in self.heldout_files]

    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of every file's path and bytes, in order: identifies the corpus."""
        digest = hashlib.sha256()
        for split, files in (("train", self.train_files), ("heldout", self.heldout_files)):
            digest.update(split.encode())
            for f in files:
                digest.update(f.encode())
                digest.update((self.root / f).read_bytes())
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        """Sizes and identity of the corpus, for a model card."""
        return {
            "root": str(self.root), "n_train_files": len(self.train_files),
            "n_heldout_files": len(self.heldout_files), "heldout_files": list(self.heldout_files),
            "train_bytes": sum((self.root / f).stat().st_size for f in self.train_files),
            "heldout_bytes": sum((self.root / f).stat().st_size for f in self.heldout_files),
            "fingerprint": self.fingerprint(),
        }


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def stdlib_dir() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def code_corpus(root: str | Path | None = None, heldout: tuple[str, ...] = HELDOUT_MODULES) -> CodeCorpus:
    """The stdlib corpus with its fixed held-out split. Example: `corpus = code_corpus(); corpus.heldout_files`"""
    root = stdlib_dir() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: the stdlib folder {root} does not exist")
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not (set(p.relative_to(root).parts[:-1]) & EXCLUDED_DIRS)
    )
    held = tuple(f for f in heldout if f in set(files))
    if not held:
        raise ValueError(f"heldout: none of {list(heldout)} is in {root}")
    return CodeCorpus(root, tuple(f for f in files if f not in set(held)), held)


def encode_texts(tokenizer, texts: list[str]) -> Int[Tensor, " n"]:
    """All `texts` tokenized (no BOS) and concatenated, each followed by a blank line's tokens."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text.rstrip("\n") + "\n\n"))
    return torch.tensor(ids, dtype=torch.long)


def random_windows(
    stream: Int[Tensor, " n"], batch: int, length: int, *, generator: torch.Generator | None = None
) -> Int[Tensor, "batch length"]:
    """`batch` windows of `length` consecutive tokens at uniformly random offsets of `stream`."""
    if len(stream) < length:
        raise ValueError(f"stream: {len(stream)} tokens is shorter than the window length {length}")
    starts = torch.randint(0, len(stream) - length + 1, (batch,), generator=generator)
    return stream[starts[:, None] + torch.arange(length)]


def code_induction_task(
    tokenizer,
    batch: int = 32,
    half_len: int = 24,
    *,
    seed: int = 0,
    corpus: CodeCorpus | None = None,
    metric: Metric | str = Metric.LOGIT_DIFF,
) -> Task:
    """Induction on repeated real code: clean = [BOS, s, s], corrupted = [BOS, s', s] with s, s' different
    snippets of `half_len` tokens of held-out stdlib code.

    The metric reads positions T+1..2T−1 (the answer is the clean next token, which repeats the first copy);
    the wrong answer is a random other token (for the logit difference). `tokenizer` is a `BPETokenizer`
    (a zoo model's `model.bpe`). Example: `task = code_induction_task(load_pretrained("attn2l-pycode").bpe)`
    """
    corpus = code_corpus() if corpus is None else corpus
    stream = encode_texts(tokenizer, corpus.heldout_texts())
    gen = torch.Generator().manual_seed(seed)
    snippets = random_windows(stream, batch, half_len, generator=gen)
    others = random_windows(stream, batch, half_len, generator=gen)
    same = (others == snippets).all(-1)
    while same.any():  # a corrupted first half must differ from the clean one
        others[same] = random_windows(stream, int(same.sum()), half_len, generator=gen)
        same = (others == snippets).all(-1)
    bos = torch.full((batch, 1), tokenizer.bos_id, dtype=torch.long)
    clean = torch.cat([bos, snippets, snippets], dim=1)
    corrupted = torch.cat([bos, others, snippets], dim=1)
    positions = second_half_positions(half_len)
    answers = clean[:, positions + 1]
    wrong = _random_other_tokens(answers, tokenizer.vocab_size, tokenizer.bos_id, gen)
    return Task("induction-code", clean, corrupted, answers, positions, wrong, Metric(metric))
