"""Stage `prepare`: tokenize one corpus into the shared on-disk format.

    python -m pipeline.prepare --corpus ptb --raw data/raw/ptb --out data/prepared/ptb

The vocabulary comes from the training split alone: every train token seen at
least `min_count` times, plus <unk> and <eos>. Valid/test tokens outside it
become <unk> and are reported as the split's OOV rate. See pipeline/dataset.py
for the format. A corpus generated from a known source (pipeline/synthetic.py)
also carries the source's entropy and its own perplexity per split into
vocab.json, after checking that the source's tokens are exactly the prepared ones.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.corpora import (
    CUSTOM,
    SPLITS,
    CorpusError,
    Level,
    Lines,
    Split,
    get_corpus,
    read_custom,
    skip_blank_lines,
)
from pipeline.dataset import EOS, UNK, id_dtype, write_split, write_vocab
from pipeline.errors import run_stage
from pipeline.params import load_section, require
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


def build_vocabulary(train: Lines, min_count: int) -> tuple[list[str], Counter]:
    """<eos> and <unk> first, then train types by falling count (ties by string)."""
    counts = Counter(tok for line in train for tok in line)
    kept = sorted((t for t, c in counts.items() if c >= min_count and t not in (EOS, UNK)),
                  key=lambda t: (-counts[t], t))
    return [EOS, UNK, *kept], counts


def encode(lines: Lines, index: dict[str, int], dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Flat ids with <eos> after every line; also returns how many tokens became <unk>
    because they are not in the vocabulary (a literal <unk> in the text is not an OOV)."""
    unk, eos = index[UNK], index[EOS]
    ids = np.empty(sum(len(line) + 1 for line in lines), dtype=dtype)
    pos = oov = 0
    for line in lines:
        for tok in line:
            i = index.get(tok)
            if i is None:
                i, oov = unk, oov + 1
            ids[pos] = i
            pos += 1
        ids[pos] = eos
        pos += 1
    return ids, oov


def prepare_corpus(name: str, raw: Path, out: Path, params: PrepareParams) -> dict:
    """Tokenize `raw` into `out`; return the vocabulary metadata that was written."""
    if name == CUSTOM:
        level, min_count = params.custom.level, params.custom.min_count
        splits, keep_blank = read_custom(raw, level, params.custom.ratios), False
    else:
        corpus = get_corpus(name)
        level, min_count = corpus.level, corpus.min_count
        splits, keep_blank = corpus.read_splits(raw), corpus.keep_blank_lines
    skipped = {split: 0 for split in SPLITS}
    if not keep_blank:
        for split in SPLITS:
            splits[split], skipped[split] = skip_blank_lines(splits[split])
    for split in SPLITS:
        if not any(splits[split]):
            raise CorpusError(f"{name}: the {split} split is empty ({raw})")
    tokens, train_counts = build_vocabulary(splits["train"], min_count)
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
        "blank_lines_skipped_per_split": skipped,
        "oov_per_split": {},
        "oov_rate_per_split": {},
    }
    with atomic_path(out, directory=True) as staging:
        split: Split
        for split in SPLITS:
            ids, oov = encode(splits[split], index, dtype)
            write_split(staging, split, ids)
            words = len(ids) - len(splits[split])
            meta["tokens_per_split"][split] = int(len(ids))
            meta["lines_per_split"][split] = len(splits[split])
            meta["oov_per_split"][split] = oov
            meta["oov_rate_per_split"][split] = round(oov / max(words, 1), 6)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--raw", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    prepare_corpus(args.corpus, args.raw, args.out, load_section("prepare", PrepareParams))


if __name__ == "__main__":
    run_stage(main)
