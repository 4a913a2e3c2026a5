"""The `longrange` corpus: dependencies at known distances, with an exactly known floor.

Every line is one dependency over a gap d, drawn uniformly from `gaps`:

    position:  0    1  ...  d-2   d-1   d
    token:     x    f  ...  f     q     y    <eos>          (d + 2 tokens)

x, a key, is uniform over `keys` words (k00, k01, ...); the d - 2 fillers are i.i.d.
from a fixed random distribution (Dirichlet(`alpha`)) over `fillers` words (f00, ...);
q is the query word `q`; the answer y is the key x again with probability
`copy_prob`, else one of the other keys, uniformly. y lies exactly d positions after x:
predicting it takes carrying x over d steps (the "she finally printed her ___" of the
textbooks, made exact). A line determines its gap (where q stands), so

    -log P(line) = log keys + log |gaps| + sum -log p(f) + (-log P(y | x))
    H            = E[-log P(line)] / E[d + 2]                  (nats per token, exact)

exp(H) is the best perplexity any model can expect. At a dependent position (y) the
best expected loss is H(y | x) (`floor_nats`); a model that forgot x can do no better
than log keys (`forget_nats` above the floor). The analyse stage finds the dependent
positions in the prepared ids (the token after each q) and reports, per gap, the mean
loss there above the floor (pipeline/recall.py).

The download stage writes train/valid/test.txt and source.json, as for `synthetic`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.params import require
from pipeline.synthetic import write_splits

QUERY = "q"


@dataclass(frozen=True)
class LongRangeParams:
    keys: int  # words that can be remembered (x) and recalled (y)
    fillers: int  # words between x and q
    alpha: float  # Dirichlet concentration of the filler distribution
    copy_prob: float  # P(y = x); else y is one of the other keys, uniformly
    gaps: tuple[int, ...]  # distances d from x to y, drawn uniformly per line
    tokens: tuple[int, ...]  # train/valid/test sizes in tokens (<eos> included), at least
    seed: int

    def validate(self, key: str) -> None:
        require(2 <= self.keys <= 100, f"{key}.keys", f"must be 2..100, got {self.keys}")
        require(1 <= self.fillers <= 100, f"{key}.fillers",
                f"must be 1..100, got {self.fillers}")
        require(self.alpha > 0, f"{key}.alpha", f"must be positive, got {self.alpha}")
        require(0 < self.copy_prob <= 1, f"{key}.copy_prob",
                f"must be in (0, 1], got {self.copy_prob}")
        require(len(self.gaps) > 0 and min(self.gaps) >= 2
                and len(set(self.gaps)) == len(self.gaps), f"{key}.gaps",
                f"expected distinct gaps of at least 2, got {list(self.gaps)}")
        require(len(self.tokens) == 3 and all(n > 0 for n in self.tokens), f"{key}.tokens",
                f"expected three positive sizes (train, valid, test), got {list(self.tokens)}")


class LongRangeSource:
    """Token ids 0..keys-1 are the keys, then the fillers, then q."""

    def __init__(self, params: LongRangeParams):
        self.params = params
        rng = np.random.default_rng([params.seed, 0])
        self.filler_probs = rng.dirichlet([params.alpha] * params.fillers)  # (F,)
        K, p = params.keys, params.copy_prob
        self.answer_entropy = -p * math.log(p) - ((1 - p) * math.log((1 - p) / (K - 1))
                                                  if p < 1 else 0.0)

    def words(self) -> list[str]:
        P = self.params
        return ([f"k{i:02d}" for i in range(P.keys)] + [f"f{i:02d}" for i in range(P.fillers)]
                + [QUERY])

    def entropy_rate(self) -> float:
        """Exact nats per token (see the module docstring)."""
        P = self.params
        gaps = np.asarray(P.gaps, dtype=float)
        p = self.filler_probs
        filler_entropy = float(-(p * np.log(p)).sum())
        per_line = (math.log(P.keys) + math.log(len(gaps))
                    + (gaps.mean() - 2) * filler_entropy + self.answer_entropy)
        return per_line / (gaps.mean() + 2)

    def sample(self, tokens: int, rng: np.random.Generator) -> tuple[list[list[int]], float]:
        """Whole lines until they hold at least `tokens` tokens (<eos> included); returns
        them (ids, without <eos>) and their total -log P in nats."""
        P = self.params
        K, F = P.keys, P.fillers
        lines, nll, total = [], 0.0, 0
        while total < tokens:
            d = int(P.gaps[rng.integers(len(P.gaps))])
            x = int(rng.integers(K))
            fill = rng.choice(F, size=d - 2, p=self.filler_probs)
            if rng.random() < P.copy_prob:
                y = x
            else:
                y = int((x + 1 + rng.integers(K - 1)) % K)  # one of the other keys
            nll += (math.log(K) + math.log(len(P.gaps))
                    - float(np.log(self.filler_probs[fill]).sum())
                    - math.log(P.copy_prob if y == x else (1 - P.copy_prob) / (K - 1)))
            lines.append([x, *(K + fill).tolist(), K + F, y])
            total += d + 2
        return lines, nll


def dependencies_of(params: LongRangeParams) -> dict:
    """What the analyse stage needs to find and judge the dependent positions."""
    source = LongRangeSource(params)
    return {"query": QUERY, "gaps": list(params.gaps), "floor_nats": source.answer_entropy,
            "forget_nats": math.log(params.keys) - source.answer_entropy}


def generate_corpus(out: Path, params: LongRangeParams) -> dict:
    """Write the three splits and source.json into `out` (atomically); return the summary."""
    source = LongRangeSource(params)
    summary = write_splits(out, source=source, params=params, order=None,
                           dependencies=dependencies_of(params))
    print(f"longrange: entropy {summary['entropy_nats']:.4f} nats/token, best achievable "
          f"perplexity {summary['floor_ppl']:.3f}; floor at the dependent positions "
          f"{source.answer_entropy:.3f} nats")
    return summary
