"""A small byte-level BPE tokenizer, trained locally with the `tokenizers` package."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from jaxtyping import Int
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

BOS = "<|bos|>"


class BPETokenizer:
    """Byte-level BPE: every string round-trips (`to_string(to_tokens(s)) == s`, BOS dropped).

    Token 0 is the BOS token. Example: `tok = BPETokenizer.train(texts, vocab_size=1024)`
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tk = tokenizer
        self.bos_id = tokenizer.token_to_id(BOS)
        if self.bos_id is None:
            raise ValueError(f"tokenizer: has no {BOS} token")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024) -> BPETokenizer:
        """Train on an iterable of strings (deterministic for the same input)."""
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS."""
        return self._tk.encode(text).ids

    def to_tokens(self, text: str, *, prepend_bos: bool = True) -> Int[Tensor, "1 pos"]:
        """`text` as a [1, pos] tensor of ids, BOS first unless `prepend_bos=False`."""
        ids = ([self.bos_id] if prepend_bos else []) + self.encode(text)
        return torch.tensor([ids], dtype=torch.long)

    def to_string(self, tokens: Int[Tensor, "... pos"] | list[int]) -> str:
        """Decode ids to text; BOS tokens are dropped."""
        ids = tokens.flatten().tolist() if isinstance(tokens, Tensor) else list(tokens)
        return self._tk.decode([i for i in ids if i != self.bos_id], skip_special_tokens=False)

    def to_str_tokens(self, tokens: Int[Tensor, " pos"] | list[int]) -> list[str]:
        """One display string per token (BOS shown as <|bos|>)."""
        ids = tokens.flatten().tolist() if isinstance(tokens, Tensor) else list(tokens)
        return [BOS if i == self.bos_id else self._tk.decode([i]) for i in ids]

    def save(self, path: str | Path) -> None:
        self._tk.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # the tokenizers error names no file
            raise ValueError(f"tokenizer file {path} is not a valid tokenizer: {err}") from err
