"""Reference interpolated modified Kneser-Ney, estimated the way KenLM's lmplz does.

Independent pure-Python code (no KenLM import), used by tests to cross-check lmplz
(Chen & Goodman 1998; Heafield et al. 2013). lmplz's conventions that matter:

* Each sentence is wrapped as <s> w1 .. wn </s>; <s> is only ever a context.
* The highest order uses raw counts. Lower orders use adjusted counts: the number of
  distinct words seen to the left, except that n-grams starting with <s> keep raw
  counts, because nothing can precede <s>.
* Discounts D1, D2, D3+ per order come from the counts-of-counts n1..n4 of those
  counts; if they are undefined or out of range, lmplz fails unless
  --discount_fallback is given (then 0.5, 1, 1.5 by default).
* Unigrams are interpolated with the uniform distribution over the vocabulary
  including </s> and <unk> but not <s> (lmplz's default --interpolate_unigrams).
  <unk> has count 0, so it gets only that interpolated mass.
* The interpolation weight gamma(ctx) is also the ARPA backoff: a seen context
  puts gamma(ctx) of its mass on the shorter context, and an unseen context
  (backoff 1) passes straight through to it.
"""
from __future__ import annotations

import math
from collections import Counter

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def raw_counts(sentences, order):
    """raw[k-1]: Counter of k-grams in the <s> ... </s>-wrapped sentences.

    The unigram <s> is left out: no n-gram predicts <s>.
    """
    raw = [Counter() for _ in range(order)]
    for sentence in sentences:
        toks = (BOS, *sentence, EOS)
        for k in range(1, order + 1):
            for i in range(len(toks) - k + 1):
                if k > 1 or toks[i] != BOS:
                    raw[k - 1][toks[i:i + k]] += 1
    return raw


def adjusted_counts(raw):
    """Highest order keeps raw counts; a lower-order n-gram counts distinct left
    extensions, except ones starting with <s>, which cannot be extended."""
    counts = [dict(raw[-1])]
    for k in range(len(raw) - 2, -1, -1):
        left = Counter(g[1:] for g in raw[k + 1])  # each distinct (k+2)-gram once
        counts.insert(0, {g: c if g[0] == BOS else left[g] for g, c in raw[k].items()})
    return counts


def lmplz_stat_counts(sentences, raw, counts):
    """Counts that lmplz 0.3.0 feeds to its counts-of-counts (not to probabilities).

    Known lmplz bug (kpu/kenlm issues #405, #427; unmerged PR #434): after its
    single pass over the highest-order n-grams in suffix order (last word first,
    compared by vocabulary id), the lower-order n-grams still pending (the
    <s>-free proper suffixes of the last such n-gram) are recorded with their
    raw count rather than their adjusted count. Ids follow first appearance:
    <unk>=0, <s>=1, </s>=2, then corpus words. Mirrored so discounts match exactly.
    """
    order = len(raw)
    stats = [dict(c) for c in counts]
    if order == 1:
        return stats
    ids = {UNK: 0, BOS: 1, EOS: 2}
    for sentence in sentences:
        for w in sentence:
            ids.setdefault(w, len(ids))
    # lmplz pads with order-1 copies of <s>, so its highest-order n-grams include e.g. <s> <s> w.
    full = set()
    for sentence in sentences:
        toks = (BOS,) * (order - 1) + (*sentence, EOS)
        full.update(toks[i:i + order] for i in range(len(toks) - order + 1))
    last = max(full, key=lambda g: [ids[w] for w in reversed(g)])
    for j in range(1, order):
        if BOS not in last[j:]:
            stats[order - j - 1][last[j:]] = raw[order - j - 1][last[j:]]
    return stats


def discounts(counts, fallback=None):
    """(D1, D2, D3+) from counts-of-counts, Chen & Goodman eq. 26, with lmplz's checks."""
    n = Counter(c for c in counts if 1 <= c <= 4)
    try:
        y = n[1] / (n[1] + 2 * n[2])
        d = tuple(j - (j + 1) * y * n[j + 1] / n[j] for j in (1, 2, 3))
    except ZeroDivisionError:
        d = None
    if d is None or any(not 0 <= dj <= j for j, dj in zip((1, 2, 3), d, strict=True)):
        if fallback is None:
            raise ValueError(f"modified KN discounts undefined for counts-of-counts {dict(n)}")
        d = tuple(fallback)
    return d


class KNModel:
    def __init__(self, order, counts, discounts_per_order, vocab):
        self.order, self.counts, self.d, self.vocab = order, counts, discounts_per_order, vocab
        # Per context: denominator (total count) and gamma (the freed mass).
        self.den, self.gamma = [], []
        for k in range(order):
            den, freed = Counter(), Counter()
            for g, c in counts[k].items():
                den[g[:-1]] += c
                freed[g[:-1]] += self._discount(k, c)
            self.den.append(den)
            self.gamma.append({ctx: freed[ctx] / den[ctx] for ctx in den})

    def _discount(self, k, c):
        return 0.0 if c == 0 else self.d[k][min(c, 3) - 1]

    def prob(self, context, word):
        """P(word | context); unknown words become <unk>, context is cut to order-1."""
        word = word if word in self.vocab else UNK
        context = tuple(w if w in self.vocab or w == BOS else UNK for w in context)
        context = context[len(context) - self.order + 1:] if self.order > 1 else ()
        return self._p(context, word)

    def _p(self, ctx, word):
        k = len(ctx)
        if k == 0:
            lower = 1.0 / len(self.vocab)  # uniform over vocab incl. </s>, <unk>; no <s>
        else:
            lower = self._p(ctx[1:], word)
        if ctx not in self.den[k]:  # never a context (e.g. contains <unk>): backoff 1
            return lower
        c = self.counts[k].get(ctx + (word,), 0)
        return (c - self._discount(k, c)) / self.den[k][ctx] + self.gamma[k][ctx] * lower

    def logprob(self, context, word):
        return math.log10(self.prob(context, word))

    def sentence_log10prob(self, sentence):
        """Like kenlm.Model.score(s, bos=True, eos=True): predict every word and </s>."""
        toks = [BOS, *sentence, EOS]
        return sum(self.logprob(toks[:i], toks[i]) for i in range(1, len(toks)))


def estimate(sentences, order, discount_fallback=None, mimic_lmplz_bug=True):
    sentences = [list(s) for s in sentences]
    raw = raw_counts(sentences, order)
    counts = adjusted_counts(raw)
    stats = lmplz_stat_counts(sentences, raw, counts) if mimic_lmplz_bug else counts
    ds = [discounts(s.values(), discount_fallback) for s in stats]
    vocab = {w for s in sentences for w in s} | {EOS, UNK}
    return KNModel(order, counts, ds, vocab)
