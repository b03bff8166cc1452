"""A word-level tokenizer built from the training captions (for the from-scratch text tower)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

PAD, UNK, CLS, EOS = "[PAD]", "[UNK]", "[CLS]", "[EOS]"
SPECIALS = (PAD, UNK, CLS, EOS)
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-case words and single punctuation marks."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Maps captions to ``[CLS] w1 .. wk [EOS] [PAD]..`` id tensors of a fixed length.

    Words seen fewer than ``min_count`` times while building map to ``[UNK]``.
    """

    def __init__(self, vocab: Sequence[str], max_length: int = 32):
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {max_length}")
        self.vocab = list(vocab)
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.max_length = max_length
        self.pad_id, self.unk_id, self.cls_id, self.eos_id = (self.index[s] for s in SPECIALS)

    @classmethod
    def build(cls, texts: Iterable[str], max_length: int = 32, min_count: int = 1) -> WordTokenizer:
        counts = Counter(word for text in texts for word in split_words(text))
        words = sorted(w for w, c in counts.items() if c >= min_count)
        return cls(list(SPECIALS) + words, max_length=max_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Returns ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) bool, L = max_length.

        Captions longer than ``max_length - 2`` words are truncated (the [EOS] is kept).
        """
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            words = split_words(text)[: self.max_length - 2]
            tokens = [self.cls_id] + [self.index.get(w, self.unk_id) for w in words] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.pad_id

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"type": "word", "max_length": self.max_length, "vocab": self.vocab}
        (folder / "tokenizer.json").write_text(json.dumps(payload, indent=0))

    @classmethod
    def load(cls, folder: Path) -> WordTokenizer:
        path = Path(folder) / "tokenizer.json"
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no tokenizer saved here") from None
        if payload.get("type") != "word":
            raise ValueError(f"{path}: not a word tokenizer (type={payload.get('type')!r})")
        return cls(payload["vocab"], max_length=payload["max_length"])
