"""Real corpora, prepared: the published counts and the Bengio et al. Brown split."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.corpora import CorpusError
from pipeline.dataset import EOS, UNK, PreparedCorpus
from pipeline.encoding import CustomCorpusParams, PrepareParams, prepare_corpus
from tests.conftest import write_custom_splits


def test_ptb_counts_match_the_published_ones(prepared):
    data = PreparedCorpus(prepared("ptb"))
    meta = data.meta
    assert meta["tokens_per_split"] == {"train": 929_589, "valid": 73_760, "test": 82_430}
    assert meta["vocab_size"] == 10_000
    assert meta["oov_per_split"] == {"train": 0, "valid": 0, "test": 0}
    for split, n in meta["tokens_per_split"].items():
        ids = data.ids(split)
        assert len(ids) == n and ids.dtype == np.uint16
        assert ids[-1] == data.vocabulary().eos_id  # every line ends with <eos>
        assert int((ids == data.vocabulary().eos_id).sum()) == meta["lines_per_split"][split]


def test_brown_split_follows_bengio(prepared):
    data = PreparedCorpus(prepared("brown"))
    meta = data.meta
    lines, tokens = meta["lines_per_split"], meta["tokens_per_split"]
    words = {s: tokens[s] - lines[s] for s in tokens}  # tokens minus one <eos> per line
    # train stops at the first sentence end at or after 800,000 words; valid after 200,000 more
    assert 800_000 <= words["train"] < 800_000 + 200
    assert 1_000_000 <= words["train"] + words["valid"] < 1_000_000 + 200
    assert sum(words.values()) == 1_161_192  # every Brown token, tags stripped
    assert words == {"train": 800_001, "valid": 200_021, "test": 161_170}
    # words seen 3 times or fewer in train are <unk>: every kept word is seen 4+ times
    counts = dict(zip(meta["tokens"], meta["train_counts"], strict=True))
    kept = [t for t in meta["tokens"] if t not in (EOS, UNK)]
    assert min(counts[t] for t in kept) == 4
    assert meta["vocab_size"] == 14_115
    assert "The" in counts and "the" in counts  # case kept
    assert "``" in counts and "." in counts  # punctuation kept


def test_tinyshakespeare_is_characters(prepared):
    data = PreparedCorpus(prepared("tinyshakespeare"))
    meta = data.meta
    assert meta["level"] == "char"
    # 1,115,394 characters, each newline being an <eos>
    assert sum(meta["tokens_per_split"].values()) == 1_115_394
    assert meta["tokens_per_split"]["train"] / 1_115_394 == pytest.approx(0.9, abs=0.001)
    text = data.vocabulary().decode(data.ids("train")[:15])
    assert text == "First Citizen:\n"


def test_vocabulary_comes_from_train_only(tmp_path):
    raw = write_custom_splits(tmp_path / "raw", "a b a\nb c\n", "a z\n", "q\n")
    meta = prepare_corpus("custom", raw, tmp_path / "out", PrepareParamsWord)
    assert meta["tokens"] == [EOS, UNK, "a", "b", "c"]
    assert meta["oov_per_split"] == {"train": 0, "valid": 1, "test": 1}
    assert meta["oov_rate_per_split"]["valid"] == 0.5
    ids = PreparedCorpus(tmp_path / "out").ids("valid")
    assert ids.tolist() == [2, 1, 0]


PrepareParamsWord = PrepareParams(CustomCorpusParams("word", (0.8, 0.1, 0.1), 1))


def test_empty_split_is_an_error_and_writes_nothing(tmp_path):
    raw = write_custom_splits(tmp_path / "raw", "a b\n", "", "a\n")
    with pytest.raises(CorpusError, match="valid split is empty"):
        prepare_corpus("custom", raw, tmp_path / "out", PrepareParamsWord)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_non_utf8_bytes_are_named(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "all.txt").write_bytes(b"good line\nbad \xff byte\n")
    with pytest.raises(CorpusError, match=r"all.txt: byte 14 \(0xff\) is not valid UTF-8"):
        prepare_corpus("custom", raw, tmp_path / "out", PrepareParamsWord)
    assert not (tmp_path / "out").exists()


def test_decode_keeps_character_spaces_and_word_lines():
    from pipeline.dataset import Vocabulary

    chars = Vocabulary((EOS, UNK, "a", " ", "b"), "char")
    assert chars.decode([2, 3, 0, 3, 4]) == "a \n b"
    words = Vocabulary((EOS, UNK, "the", "cat"), "word")
    assert words.decode([2, 3, 0, 2]) == "the cat\nthe"
