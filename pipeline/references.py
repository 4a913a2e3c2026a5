"""Published perplexities to compare against (see the design guide's table).

Keyed by (corpus, our model name). A reference describes *its* configuration;
the leaderboard prints it beside ours with the difference, and the note says
where the setups differ.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    description: str
    valid: float | None
    test: float | None
    source: str


# (corpus, model) -> reference; a (corpus, model, preset) entry wins for that preset.
REFERENCES: dict[tuple[str, ...], Reference] = {
    ("ptb", "kn5"): Reference("Kneser-Ney 5-gram", None, 141.2,
                              "Mikolov & Zweig 2012; Mikolov 2012 thesis, table 4.1"),
    ("brown", "kn3"): Reference("Kneser-Ney back-off 3-gram (SRILM), vocabulary 16,383", 334, 323,
                                "Bengio et al. 2003, table 1"),
    ("ptb", "window"): Reference("feed-forward NNLM", None, 140.2, "Mikolov 2012 thesis"),
    ("ptb", "rnn"): Reference("RNN", None, 124.7, "Mikolov & Zweig 2012"),
    ("ptb", "lstm2", "paper"): Reference("2-layer LSTM 650, dropout 0.5, 39 epochs (medium)",
                                         86.2, 82.7, "Zaremba et al. 2014"),
    # the quick preset's lstm2 (200 units) is closest to Zaremba's small model
    ("ptb", "lstm2", "quick"): Reference("2-layer LSTM 200, no dropout, 13 epochs (small)",
                                         120.7, 114.5, "Zaremba et al. 2014"),
    ("brown", "window"): Reference("MLP n=5, h=100, m=30 (MLP9)", 280, 276,
                                   "Bengio et al. 2003, table 1"),
}


def reference_for(corpus: str, model: str, preset: str | None = None) -> Reference | None:
    return REFERENCES.get((corpus, model, preset or "")) or REFERENCES.get((corpus, model))
