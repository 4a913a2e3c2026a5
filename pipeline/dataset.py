"""The prepared-corpus format shared by every model (written by `prepare`).

    data/prepared/<corpus>/
        vocab.json            vocabulary (id order), specials, counts, OOV rates
        train.npy valid.npy test.npy
                              flat token-id arrays (uint16, or uint32 for vocabularies
                              over 65,535 types); every line ends with the <eos> id

One vocabulary per corpus, from the training split only. `<unk>` is an ordinary
item of it, and <eos> is predicted and counted like any other token.

The id arrays are memory-mapped, never loaded whole (`PreparedCorpus.ids`), and
read in pieces of whole lines (`line_chunks`), so a corpus larger than memory
(WikiText-103 and beyond) is read with bounded memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path, write_json
from pipeline.errors import UserError


class DataError(UserError, ValueError):
    """Prepared data the stages cannot use as it is (the message says what to change)."""

EOS = "<eos>"
UNK = "<unk>"
VOCAB_FILE = "vocab.json"
CHUNK_TOKENS = 1 << 20  # ids read at a time by `line_chunks`


def id_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise DataError(f"vocabulary of {vocab_size:,} types does not fit a uint32 token id; "
                     "keep fewer types (e.g. raise prepare.custom.min_count)")


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]
    level: str  # "word" or "char"

    @property
    def eos_id(self) -> int:
        return self.tokens.index(EOS)

    @property
    def unk_id(self) -> int:
        return self.tokens.index(UNK)

    def __len__(self) -> int:
        return len(self.tokens)

    def digest(self) -> str:
        """Identifies the vocabulary: checkpoints and metrics carry it."""
        return hashlib.sha256("\n".join(self.tokens).encode()).hexdigest()[:16]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of `ids`, <eos> as a line break."""
        tokens = ["\n" if self.tokens[int(i)] == EOS else self.tokens[int(i)] for i in ids]
        if self.level == "char":
            return "".join(tokens)
        return " ".join(tokens).replace(" \n ", "\n").replace(" \n", "\n")


@dataclass(frozen=True)
class PreparedCorpus:
    folder: Path

    @functools.cached_property
    def meta(self) -> dict:
        path = self.folder / VOCAB_FILE
        if not path.is_file():
            raise DataError(f"{self.folder}: no prepared corpus ({VOCAB_FILE} missing); run "
                            "its prepare stage (`dvc repro prepare@<corpus>`) or `dvc pull`")
        return json.loads(path.read_text(encoding="utf-8"))

    def vocabulary(self) -> Vocabulary:
        meta = self.meta
        return Vocabulary(tuple(meta["tokens"]), meta["level"])

    def ids(self, split: str) -> np.ndarray:
        """The split's ids, memory-mapped read-only (pages are read as they are used)."""
        return np.load(split_path(self.folder, split), mmap_mode="r")

    def line_chunks(self, split: str, tokens: int = CHUNK_TOKENS) -> Iterator[np.ndarray]:
        """The split's ids in consecutive pieces of whole lines (each ends with <eos>),
        about `tokens` long (longer where one line is): memory holds one piece."""
        ids, eos = self.ids(split), self.vocabulary().eos_id
        start = 0
        while start < len(ids):
            piece = np.asarray(ids[start:start + tokens])
            ends = np.flatnonzero(piece == eos)
            while not len(ends) and start + len(piece) < len(ids):  # a line longer than that
                piece = np.asarray(ids[start:start + 2 * len(piece)])
                ends = np.flatnonzero(piece == eos)
            if not len(ends):
                raise DataError(f"{split_path(self.folder, split)}: the last line has no "
                                "<eos> (rerun prepare)")
            yield piece[:ends[-1] + 1]
            start += int(ends[-1]) + 1

    def sentences(self, split: str) -> Iterator[np.ndarray]:
        """Yield each line's ids without its <eos> (for sentence-level n-gram scoring)."""
        eos = self.vocabulary().eos_id
        for piece in self.line_chunks(split):
            start = 0
            for end in np.flatnonzero(piece == eos):
                yield piece[start:end]
                start = end + 1


def split_path(folder: Path, split: str) -> Path:
    return folder / f"{split}.npy"


def write_split(folder: Path, split: str, ids: np.ndarray) -> None:
    with atomic_path(split_path(folder, split)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, ids)


def write_vocab(folder: Path, meta: dict) -> None:
    write_json(folder / VOCAB_FILE, meta)
