"""The n-gram stage on real data: counts agree with prepare, known perplexities."""

from __future__ import annotations

import pytest

from pipeline.dataset import PreparedCorpus
from pipeline.encoding import prepare_corpus
from pipeline.kneser_ney import NgramError, NgramParams, build_ngram, score_split
from tests.conftest import write_custom_splits
from tests.test_prepare import PrepareParamsWord

PARAMS = NgramParams(orders=(2, 3), discount_fallback=(), memory="200M")


def test_ptb_trigram(prepared, tmp_path):
    folder = prepared("ptb")
    metrics = build_ngram("ptb", 3, folder, tmp_path / "kn3.bin", PARAMS)
    meta = PreparedCorpus(folder).meta
    assert metrics["valid_tokens"] == meta["tokens_per_split"]["valid"] == 73_760
    assert metrics["test_tokens"] == meta["tokens_per_split"]["test"] == 82_430
    # measured with KenLM 0.3.0 (see README); a changed count, vocabulary or <eos> moves it
    assert metrics["test_ppl"] == pytest.approx(148.28, abs=0.01)
    assert metrics["ngram_counts"]["1"] == 10_002  # vocabulary + <s> + KenLM's own <unk>
    assert (tmp_path / "kn3.bin").stat().st_size > 0


def tiny_corpus(tmp_path):
    raw = write_custom_splits(tmp_path / "raw", "a b\nb a\na b\n", "a b\n", "b a\n")
    out = tmp_path / "prepared"
    prepare_corpus("custom", raw, out, PrepareParamsWord)
    return out


def test_too_small_for_discounts_names_the_param(tmp_path):
    data = tiny_corpus(tmp_path)
    with pytest.raises(NgramError, match=r"Add 'custom' to params `ngram.discount_fallback`"):
        build_ngram("custom", 2, data, tmp_path / "kn2.bin", PARAMS)
    assert not (tmp_path / "kn2.bin").exists()


def test_tokens_the_model_never_saw_are_refused(tmp_path):
    """The stage asserts zero OOVs on valid and test: a split holding words that the
    model's training text did not (data prepared with another vocabulary) fails, naming
    the split and the words, instead of KenLM scoring them as its <unk>."""
    import kenlm

    params = NgramParams(orders=(2,), discount_fallback=("custom",), memory="100M")
    build_ngram("custom", 2, tiny_corpus(tmp_path / "a"), tmp_path / "kn2.bin", params)
    model = kenlm.Model(str(tmp_path / "kn2.bin"))  # its words: t2 (a), t3 (b)
    # another corpus: the same first words (ids 2, 3), then c and d (ids 4, 5)
    raw = write_custom_splits(tmp_path / "b" / "raw", "a b\nb a\na b\nc d\n", "b a\n", "c d\n")
    prepare_corpus("custom", raw, tmp_path / "b" / "prepared", PrepareParamsWord)
    other = PreparedCorpus(tmp_path / "b" / "prepared")
    assert score_split(model, other, "valid").tokens == 3  # b a <eos>: all known
    with pytest.raises(NgramError, match=r"^KenLM reports out-of-vocabulary tokens in test: "
                                         r"\['t4', 't5'\] \(the prepared data and the n-gram "
                                         r"model disagree"):
        score_split(model, other, "test")


def test_discount_fallback_is_recorded(tmp_path):
    data = tiny_corpus(tmp_path)
    params = NgramParams(orders=(2,), discount_fallback=("custom",), memory="100M")
    metrics = build_ngram("custom", 2, data, tmp_path / "kn2.bin", params)
    assert metrics["discount_fallback"] is True
    assert metrics["test_tokens"] == 3
    assert 1.0 < metrics["test_ppl"] < 6.0  # 5 types: a, b, <eos>, <unk> (+ KenLM's <unk>)


def test_char_corpus_reports_bits_per_character(prepared, tmp_path):
    params = NgramParams(orders=(3,), discount_fallback=("tinyshakespeare",), memory="200M")
    metrics = build_ngram("tinyshakespeare", 3, prepared("tinyshakespeare"),
                          tmp_path / "kn3.bin", params)
    assert metrics["test_bpc"] == pytest.approx(metrics["test_nll_nats"] / metrics["test_tokens"]
                                                 / 0.6931471805599453, rel=1e-4)
    assert metrics["test_tokens"] == 55_758
