"""Tokenizing one corpus into the shared on-disk format (the `prepare` stage's work,
pipeline/stages/prepare.py).

The vocabulary comes from the training split alone: every train token seen at
least `min_count` times, plus <unk> and <eos>. Valid/test tokens outside it
become <unk> and are reported as the split's OOV rate. See pipeline/dataset.py
for the format. A corpus generated from a known source (pipeline/synthetic.py)
also carries the source's entropy and its own perplexity per split into
vocab.json, after checking that the source's tokens are exactly the prepared ones.

Memory stays bounded whatever the corpus size (a counting pass, then an encoding
pass that writes ids a chunk at a time): what it holds is the vocabulary's counts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.corpora import (
    CUSTOM,
    SPLITS,
    CorpusError,
    Level,
    LineSource,
    Split,
    SplitSources,
    custom_splits,
    get_corpus,
    is_blank,
)
from pipeline.dataset import EOS, UNK, id_dtype, split_path, write_vocab
from pipeline.params import require
from pipeline.synthetic import SOURCE_FILE


@dataclass(frozen=True)
class CustomCorpusParams:
    level: Level
    ratios: tuple[float, ...]  # train/valid/test shares when given one file
    min_count: int

    def validate(self, key: str) -> None:
        require(len(self.ratios) == 3 and all(r > 0 for r in self.ratios),
                f"{key}.ratios", f"expected three positive shares, got {list(self.ratios)}")
        require(abs(sum(self.ratios) - 1) < 1e-9, f"{key}.ratios",
                f"shares must sum to 1, got {sum(self.ratios)}")
        require(self.min_count >= 1, f"{key}.min_count", f"must be >= 1, got {self.min_count}")


@dataclass(frozen=True)
class PrepareParams:
    custom: CustomCorpusParams


CHUNK_TOKENS = 1 << 16  # tokens counted or encoded at a time: bounds the memory of a pass


@dataclass
class SplitStats:
    """What the counting pass learns of one split (blank lines already skipped)."""

    lines: int = 0
    words: int = 0  # tokens without the <eos> of each line
    blank_skipped: int = 0

    @property
    def tokens(self) -> int:
        return self.words + self.lines  # + <eos> after every line


def kept_lines(source: LineSource, keep_blank: bool, stats: SplitStats | None = None
               ) -> Iterator[list[str]]:
    """The split's lines but its blank ones (unless `keep_blank`), counted into `stats`."""
    for line in source():
        if not keep_blank and is_blank(line):
            if stats is not None:
                stats.blank_skipped += 1
            continue
        if stats is not None:
            stats.lines += 1
            stats.words += len(line)
        yield line


def token_chunks(lines: Iterable[list[str]], eos: str | None = None,
                 bar: tqdm | None = None) -> Iterator[list[str]]:
    """The lines' tokens in lists of about CHUNK_TOKENS, `eos` after every line if given."""
    chunk: list[str] = []
    for line in lines:
        chunk.extend(line)
        if eos is not None:
            chunk.append(eos)
        if len(chunk) >= CHUNK_TOKENS:
            if bar is not None:
                bar.update(len(chunk))
            yield chunk
            chunk = []
    if chunk:
        if bar is not None:
            bar.update(len(chunk))
        yield chunk


def count_splits(sources: SplitSources, keep_blank: bool) -> tuple[dict[Split, SplitStats],
                                                                   Counter]:
    """Pass 1: every split's line and token counts, and the train split's type counts."""
    stats = {split: SplitStats() for split in SPLITS}
    train_counts: Counter = Counter()
    for split in SPLITS:
        lines = kept_lines(sources[split], keep_blank, stats[split])
        with _bar(f"count {split}") as bar:
            for chunk in token_chunks(lines, bar=bar):
                if split == "train":
                    train_counts.update(chunk)
    return stats, train_counts


def build_vocabulary(counts: Counter, min_count: int) -> list[str]:
    """<eos> and <unk> first, then train types by falling count (ties by string)."""
    kept = sorted((t for t, c in counts.items() if c >= min_count and t not in (EOS, UNK)),
                  key=lambda t: (-counts[t], t))
    return [EOS, UNK, *kept]


def encode_split(lines: Iterable[list[str]], index: dict[str, int], dtype: np.dtype,
                 tokens: int, path: Path, desc: str) -> int:
    """Pass 2: write the flat ids of `lines`, <eos> after every line, to the .npy `path`
    (exactly what np.save writes for the whole array) a chunk at a time. Returns how many
    tokens became <unk> because they are not in the vocabulary (a literal <unk> in the
    text is not an OOV)."""
    unk = index[UNK]
    written = oov = 0
    with open(path, "wb") as f, _bar(desc, total=tokens) as bar:
        np.lib.format.write_array_header_1_0(f, {
            "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": (tokens,)})
        for chunk in token_chunks(lines, eos=EOS, bar=bar):
            ids = np.fromiter(map(index.get, chunk, repeat(-1)), dtype=np.int64,
                              count=len(chunk))
            missing = ids < 0
            oov += int(missing.sum())
            ids[missing] = unk
            f.write(ids.astype(dtype).tobytes())
            written += len(ids)
    if written != tokens:
        raise CorpusError(f"{path.name}: the raw files changed while prepare read them "
                          f"({tokens} tokens counted, {written} encoded); run it again")
    return oov


def _bar(desc: str, total: int | None = None) -> tqdm:
    return tqdm(total=total, desc=desc, unit=" tok", unit_scale=True, leave=False,
                disable=None)


def prepare_corpus(name: str, raw: Path, out: Path, params: PrepareParams) -> dict:
    """Tokenize `raw` into `out`; return the vocabulary metadata that was written.

    Two streaming passes, so memory does not grow with the corpus: the first counts
    lines, tokens and the train split's types; the second encodes each split into its
    .npy, sized from the first pass's counts."""
    if name == CUSTOM:
        level, min_count = params.custom.level, params.custom.min_count
        sources, keep_blank = custom_splits(raw, level, params.custom.ratios), False
    else:
        corpus = get_corpus(name)
        level, min_count = corpus.level, corpus.min_count
        sources, keep_blank = corpus.splits(raw), corpus.keep_blank_lines
    stats, train_counts = count_splits(sources, keep_blank)
    for split in SPLITS:
        if not stats[split].words:
            raise CorpusError(f"{name}: the {split} split is empty ({raw})")
    tokens = build_vocabulary(train_counts, min_count)
    index = {tok: i for i, tok in enumerate(tokens)}
    dtype = id_dtype(len(tokens))
    meta: dict = {
        "corpus": name,
        "level": level,
        "min_count": min_count,
        "vocab_size": len(tokens),
        "dtype": dtype.name,
        "tokens_per_split": {},
        "lines_per_split": {},
        "blank_lines_skipped_per_split": {s: stats[s].blank_skipped for s in SPLITS},
        "oov_per_split": {},
        "oov_rate_per_split": {},
    }
    with atomic_path(out, directory=True) as staging:
        split: Split
        for split in SPLITS:
            counted = stats[split]
            oov = encode_split(kept_lines(sources[split], keep_blank), index, dtype,
                               counted.tokens, split_path(staging, split), f"encode {split}")
            meta["tokens_per_split"][split] = counted.tokens
            meta["lines_per_split"][split] = counted.lines
            meta["oov_per_split"][split] = oov
            meta["oov_rate_per_split"][split] = round(oov / max(counted.words, 1), 6)
        if (raw / SOURCE_FILE).exists():
            meta["source"] = known_source(raw / SOURCE_FILE, meta)
        meta["tokens"] = tokens
        meta["train_counts"] = [train_counts.get(t, 0) for t in tokens]
        write_vocab(staging, meta)
    print(f"{name}: vocabulary {len(tokens)}, tokens {meta['tokens_per_split']}, "
          f"OOV rate {meta['oov_rate_per_split']}")
    return meta


def known_source(path: Path, meta: dict) -> dict:
    """The generating source's entropy and per-split perplexity, valid for these ids only
    if every generated token survived tokenization as itself (no <unk>, same counts)."""
    source = json.loads(path.read_text(encoding="utf-8"))
    for split in SPLITS:
        generated = source["splits"][split]["tokens"]
        if meta["tokens_per_split"][split] != generated or meta["oov_per_split"][split]:
            raise CorpusError(
                f"{path}: the source generated {generated} {split} tokens, prepare made "
                f"{meta['tokens_per_split'][split]} with {meta['oov_per_split'][split]} "
                "<unk>; its entropy would not describe this data (make train larger)")
    return {"order": source["order"], "entropy_nats": source["entropy_nats"],
            "entropy_bits": source["entropy_bits"], "floor_ppl": source["floor_ppl"],
            "ppl_per_split": {s: source["splits"][s]["ppl"] for s in SPLITS},
            # longrange: where the dependent positions are and their floor
            **({"dependencies": source["dependencies"]} if "dependencies" in source else {})}
