"""The `synthetic` corpus: text from a known source, so the best achievable perplexity is known.

The source is a sparse random trigram model over `vocab_size` words (w000, w001, ...).
Every context of two previous tokens (`<s> <s>` at a sentence start) allows
`successors` next words, drawn at random, with probabilities from a symmetric
Dirichlet(`alpha`); the end of the sentence follows any context but the start with
probability `end_prob`. Sentences are independent. Everything is drawn from
numpy generators seeded by `seed`, so the same params give the same bytes.

Its true per-token entropy is computed exactly. Sentences are independent, so
the entropy rate of the token stream (every `<eos>` counted, as the perplexity
contract counts it) is

    H = E[-log P(sentence)] / E[tokens per sentence, <eos> included]
      = sum_s n(s) H(next | s) / sum_s n(s)

where n(s) is the expected number of visits to context s in one sentence (the
first row of the absorbing chain's fundamental matrix, e_start (I - Q)^-1),
summed here as the series of position-by-position context distributions until
less than 1e-15 of the probability is left in unfinished sentences. exp(H) is
the best perplexity any model can expect; an n-gram of the source's order,
trained on enough text, should come close to it.

The download stage writes train/valid/test.txt (one sentence per line) and
`source.json` (params, H, and the source's own negative log-likelihood of
every split, i.e. the oracle's perplexity on exactly these samples).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_path, write_json
from pipeline.corpora import SPLITS
from pipeline.params import require

SOURCE_FILE = "source.json"
ORDER = 3  # a trigram source: the next token depends on the two before it
MAX_VOCAB, MAX_SUCCESSORS = 200, 64  # keeps the tables (contexts x outcomes) under 100 MB


@dataclass(frozen=True)
class SyntheticParams:
    vocab_size: int  # words, <eos> not included
    successors: int  # words allowed after each context
    alpha: float  # Dirichlet concentration of their probabilities (small = peaked)
    end_prob: float  # probability of <eos> after any context but the sentence start
    tokens: tuple[int, ...]  # train/valid/test sizes in tokens (<eos> included), at least
    seed: int

    def validate(self, key: str) -> None:
        require(2 <= self.vocab_size <= MAX_VOCAB, f"{key}.vocab_size",
                f"must be 2..{MAX_VOCAB}, got {self.vocab_size}")
        most = min(self.vocab_size, MAX_SUCCESSORS)
        require(1 <= self.successors <= most, f"{key}.successors",
                f"must be 1..vocab_size (at most {MAX_SUCCESSORS}), got {self.successors}")
        require(self.alpha > 0, f"{key}.alpha", f"must be positive, got {self.alpha}")
        require(0 < self.end_prob < 1, f"{key}.end_prob",
                f"must be between 0 and 1, got {self.end_prob}")
        require(len(self.tokens) == 3 and all(n > 0 for n in self.tokens), f"{key}.tokens",
                f"expected three positive sizes (train, valid, test), got {list(self.tokens)}")


class TrigramSource:
    """Contexts are numbered a * (V + 1) + b for previous tokens a, b in 0..V, where V is
    the `<s>` of a sentence start and 0..V-1 are words. Outcome V is `<eos>`."""

    def __init__(self, params: SyntheticParams):
        V, k = params.vocab_size, params.successors
        self.V, self.params = V, params
        rng = np.random.default_rng([params.seed, 0])
        n_contexts = (V + 1) ** 2
        self.start = V * (V + 1) + V  # <s> <s>
        # outcomes[s]: the k allowed words of context s, then <eos>; probs[s]: P(outcome | s)
        self.outcomes = np.empty((n_contexts, k + 1), dtype=np.int64)
        self.probs = np.empty((n_contexts, k + 1))
        for s in range(n_contexts):
            end = 0.0 if s == self.start else params.end_prob
            self.outcomes[s, :k] = rng.choice(V, size=k, replace=False)
            self.outcomes[s, k] = V
            self.probs[s, :k] = rng.dirichlet([params.alpha] * k) * (1 - end)
            self.probs[s, k] = end
        self.cumulative = np.cumsum(self.probs, axis=1)
        # the last possible outcome ends at exactly 1, so rounding never picks an impossible one
        last_possible = np.where(self.probs[:, k] > 0, k, k - 1)
        self.cumulative[np.arange(n_contexts), last_possible] = 1.0
        # the context after each word outcome: (previous token, word)
        self.successor_context = (np.arange(n_contexts)[:, None] % (V + 1)) * (V + 1) \
            + self.outcomes[:, :k]

    def words(self) -> list[str]:
        return [f"w{i:03d}" for i in range(self.V)]

    def context_entropy(self) -> np.ndarray:
        """H(next token | context), nats, for every context."""
        p = self.probs
        return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)

    def entropy_rate(self) -> float:
        """Exact nats per token (see the module docstring)."""
        k = self.params.successors
        at = np.zeros(len(self.probs))  # P(a sentence is at context s at this position)
        at[self.start] = 1.0
        visits = np.zeros_like(at)
        while at.sum() > 1e-15:
            visits += at
            at = np.bincount(self.successor_context.ravel(), minlength=len(at),
                             weights=(at[:, None] * self.probs[:, :k]).ravel())
        return float(visits @ self.context_entropy() / visits.sum())

    def sample(self, tokens: int, rng: np.random.Generator) -> tuple[list[list[int]], float]:
        """Whole sentences until they hold at least `tokens` tokens (<eos> included);
        returns them (word ids, without <eos>) and their total -log P in nats."""
        k = self.params.successors
        sentences, nll, total = [], 0.0, 0
        with tqdm(total=tokens, unit=" tok", desc="synthetic", leave=False, disable=None) as bar:
            while total < tokens:
                s, sentence = self.start, []
                while True:
                    j = int(np.searchsorted(self.cumulative[s], rng.random(), side="right"))
                    nll -= math.log(self.probs[s, j])
                    if j == k:
                        break
                    sentence.append(int(self.outcomes[s, j]))
                    s = int(self.successor_context[s, j])
                sentences.append(sentence)
                total += len(sentence) + 1
                bar.update(len(sentence) + 1)
        return sentences, nll


def write_splits(out: Path, *, source, params, order: int | None, **extra) -> dict:
    """Sample the three splits of a generated corpus and write them, with source.json,
    into `out` (atomically: all files or none); return source.json's summary: `params`,
    the source's `order`, its exact entropy rate (nats and bits per token) and floor
    perplexity, `extra`, and each split's tokens and nll. `source` has `entropy_rate()`,
    `words()` and `sample(tokens, rng) -> (lines of word ids, nll in nats)`; `params` has
    `tokens` (per split) and `seed`. One generator per split: resizing train leaves valid
    and test as they were."""
    entropy, words = source.entropy_rate(), source.words()
    summary: dict = {"params": asdict(params), "order": order, "entropy_nats": entropy,
                     "entropy_bits": entropy / math.log(2), "floor_ppl": math.exp(entropy),
                     **extra, "splits": {}}
    with atomic_path(out, directory=True) as staging:
        for index, (split, size) in enumerate(zip(SPLITS, params.tokens, strict=True)):
            rng = np.random.default_rng([params.seed, 1 + index])
            lines, nll = source.sample(size, rng)
            tokens = sum(len(line) + 1 for line in lines)  # every <eos> counted
            text = "".join(" ".join(words[w] for w in line) + "\n" for line in lines)
            (staging / f"{split}.txt").write_text(text, encoding="utf-8")
            summary["splits"][split] = {"tokens": tokens, "nll_nats": nll,
                                        "ppl": math.exp(nll / tokens)}
        write_json(staging / SOURCE_FILE, summary)
    return summary


def generate_corpus(out: Path, params: SyntheticParams) -> dict:
    """Write the three splits and source.json into `out` (atomically); return the summary."""
    summary = write_splits(out, source=TrigramSource(params), params=params, order=ORDER)
    print(f"synthetic: entropy {summary['entropy_nats']:.4f} nats/token, best achievable "
          f"perplexity {summary['floor_ppl']:.3f}; the source scores test ppl "
          f"{summary['splits']['test']['ppl']:.3f} on its own sample")
    return summary
