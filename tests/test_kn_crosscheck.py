"""Cross-check lmplz's modified Kneser-Ney estimates against an independent reference.

lmplz builds an ARPA from a tiny corpus, kenlm scores sentences from it, and
tests/kn_reference.py must give the same log10 probabilities.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import kenlm  # noqa: E402  (a hard dependency: no skip)
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import kn_reference  # noqa: E402

from pipeline.kenlm_tools import tool_path  # noqa: E402

# 14 sentences over 11 words, with repeats so that every order has n-grams with
# (adjusted) counts 1 to 4 and lmplz's closed-form discounts are valid for orders 2
# and 3 without --discount_fallback. The last lower-order n-grams in lmplz's
# suffix order ("loudly", "ran loudly") have raw count != adjusted count, so this
# corpus also exercises the counts-of-counts bug the reference mirrors.
CORPUS = """\
the bird sang away
a bird ran loudly
a dog ran away
the bird sat
the dog ran down
a bird ran
the bird sat
the cat ran away
the cat sat away
the bird sang
the cat sat down
the cat sat down
the dog sat away
the bird sat
"""
SENTENCES = [line.split() for line in CORPUS.splitlines()]

TEST_SENTENCES = [
    "the cat sat down",  # seen sentence
    "a bird ran away",  # seen n-grams, unseen trigram "bird ran away"
    "the dog sat loudly",  # unseen bigram "sat loudly"
    "cat the sat",  # unseen everything: backoff chain down to unigrams
    "the fish sat",  # out-of-vocabulary word -> <unk>, context reset after it
    "down down away",
    "a a a",
    "",  # just <s> </s>
]


def build_arpa(tmp_path: Path, sentences, order: int, extra_args=()) -> Path:
    text = tmp_path / "in.txt"
    text.write_text("".join(" ".join(s) + "\n" for s in sentences))
    arpa = tmp_path / f"o{order}.arpa"
    subprocess.run(
        [str(tool_path("lmplz")), "-o", str(order), "--text", str(text), "--arpa", str(arpa),
         "-S", "100M", "-T", str(tmp_path), *extra_args],
        check=True, capture_output=True,
    )
    return arpa


@pytest.fixture(scope="module", params=[2, 3], ids=lambda o: f"order{o}")
def models(request, tmp_path_factory):
    order = request.param
    arpa = build_arpa(tmp_path_factory.mktemp(f"kn{order}"), SENTENCES, order)
    return kenlm.Model(str(arpa)), kn_reference.estimate(SENTENCES, order)


@pytest.mark.parametrize("sentence", TEST_SENTENCES)
def test_sentence_log10prob_matches_kenlm(models, sentence):
    lm, ref = models
    words = sentence.split()
    expected = lm.score(sentence, bos=True, eos=True)
    assert ref.sentence_log10prob(words) == pytest.approx(expected, abs=1e-4)
    # Per word too, so a failure points at the offending n-gram.
    toks = ["<s>", *words, "</s>"]
    for i, (logp, _, _) in enumerate(lm.full_scores(sentence, bos=True, eos=True), start=1):
        assert ref.logprob(toks[:i], toks[i]) == pytest.approx(logp, abs=1e-4), toks[: i + 1]


CONTEXTS = [["<s>"], ["<s>", "the"], ["the", "cat"], ["cat", "the"], ["fish"], []]


@pytest.mark.parametrize("context", CONTEXTS)
def test_reference_distributions_sum_to_one(models, context):
    _, ref = models
    total = sum(ref.prob(context, w) for w in ref.vocab)  # vocab has </s> and <unk>, not <s>
    assert math.isclose(total, 1.0, abs_tol=1e-9)


def test_corpus_exercises_lmplz_counts_of_counts_quirk(models):
    # Without mirroring lmplz's raw-count slip for the last lower-order n-grams, the
    # discounts (and scores) differ; this keeps the mirror in kn_reference honest.
    lm, _ = models
    plain = kn_reference.estimate(SENTENCES, len(models[1].counts), mimic_lmplz_bug=False)
    gaps = [abs(plain.sentence_log10prob(s.split()) - lm.score(s)) for s in TEST_SENTENCES]
    assert max(gaps) > 1e-2


def test_discount_fallback_matches_kenlm(tmp_path):
    # Some discounts of this smaller corpus are undefined or out of range, so lmplz
    # needs --discount_fallback and substitutes 0.5/1/1.5 for those orders only.
    small = SENTENCES[:10]
    with pytest.raises(ValueError):
        kn_reference.estimate(small, 3)
    lm = kenlm.Model(str(build_arpa(tmp_path, small, 3, ["--discount_fallback"])))
    ref = kn_reference.estimate(small, 3, discount_fallback=(0.5, 1.0, 1.5))
    for s in TEST_SENTENCES:
        assert ref.sentence_log10prob(s.split()) == pytest.approx(lm.score(s), abs=1e-4)
