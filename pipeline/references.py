"""Published perplexities, each with the configuration it was measured with.

A reference is compared with a row of ours ("ours − published") only when the
row ran that configuration: same corpus, same model (a kind such as `lstm2`, or
`kn<order>`), and every setting the reference requires equal to the row's
resolved value. Otherwise the published figure is context: shown with its
configuration and the reason it is not comparable, never with a difference (a
difference between two different experiments is neither an error nor a result).
`compare` decides this for a row; the leaderboard and the report only print it.

The configuration is not the whole protocol: which model's test perplexity a paper
reports is part of it. Each reference names its selection protocol: the model at
the last epoch (Zaremba et al., the TensorFlow tutorial), the best of the end-of-epoch
validation points (PyTorch's word_language_model), the one model an n-gram is, or not
published (context only). Our own figure, `test_ppl`, is the best validation point's
(mid-epoch points included); the train stage also records ours under each protocol it
can (metrics `protocols`), and "ours − published" uses ours under the reference's
protocol, or is not given when the run recorded none.

Figures and sources: the design guide's table. Not listed, because no model of
ours is of their kind: the Good-Turing 3-gram (ours are Kneser-Ney), AWD-LSTM and
the character transformer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Top-level metrics fields a reference may require, besides a neural row's `config`.
ROW_FIELDS = ("vocab_size", "order", "discount_fallback")
REFERENCES_NOTE = (
    "\"ours − published\" is given only for a row that ran the published configuration "
    "(model, sizes, dropout, tying, training schedule, epochs, vocabulary); any other "
    "published figure is context, shown with its configuration and why it is not comparable.")
CONFIG_NOT_PUBLISHED = "configuration not published in full"
# Selection protocols: whose test perplexity a reference reports. The first two are keys of
# a neural metrics file's `protocols` (pipeline/neural.py writes them under these names).
LAST_EPOCH = "last epoch"  # the model after the final epoch
BEST_EPOCH_END = "best end-of-epoch validation"  # the best of the points on epoch ends
ONE_MODEL = "one model"  # an n-gram: estimated once, nothing is selected
NOT_PUBLISHED = "not published"  # context only: never compared
PROTOCOLS = (LAST_EPOCH, BEST_EPOCH_END, ONE_MODEL, NOT_PUBLISHED)
BENGIO_BROWN = ("not comparable, their preprocessing differs (V = 16,383 words from the same "
                "split and rare-word rule, so their tokens are not ours)")


@dataclass(frozen=True)
class Reference:
    """One published result and the configuration it was measured with."""

    corpus: str
    model: str  # the model of ours it speaks of: a kind (rnn, gru, lstm2, ...) or kn<order>
    description: str  # the published model, with its configuration in words
    valid: float | None  # perplexity of the validation split
    test: float | None  # perplexity of the test split
    source: str
    protocol: str  # one of PROTOCOLS: whose test perplexity `test` is
    # setting -> value a row must have, as metrics files spell them (`config`, plus ROW_FIELDS);
    # lr and clip in time_sum units (see in_time_sum_units)
    settings: Mapping[str, Any] = field(default_factory=dict)
    not_comparable: str = ""  # why no row of ours can match; "" = comparable when settings do

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"{self.source}: unknown protocol {self.protocol!r}")
        if self.protocol == NOT_PUBLISHED and not self.not_comparable:
            raise ValueError(f"{self.source}: a reference whose protocol is not published "
                             "is context only (set not_comparable)")


@dataclass(frozen=True)
class Comparison:
    """What a row is shown against: a reference, and whether it is a like-for-like match."""

    reference: Reference | None
    match: bool  # same configuration, and our run recorded its figure under the protocol
    note: str = ""  # why the reference is context only; "" for a match or no reference
    ours: float | None = None  # our test perplexity under the reference's protocol

    def difference(self) -> float | None:
        """ours (under the reference's protocol) − published test perplexity, only for a
        match (else None)."""
        if not self.match or self.reference.test is None or not _present(self.ours):
            return None
        return round(self.ours - self.reference.test, 2)


def _zaremba(size: str, units: int, dropout: float, init_range: float, bptt: int, epochs: int,
             lr_decay: float, decay_after: int, clip: float,
             valid: float, test: float, tensorflow: str) -> Reference:
    """Zaremba et al. 2014's PTB lstm2 (section 4.1); lr and clip in their time_sum units."""
    no_dropout = "no dropout" if dropout == 0 else f"dropout {dropout:g}"
    settings = {
        "embedding_size": units, "hidden_size": units, "dropout": dropout, "tie_weights": False,
        "init_range": init_range, "batch_size": 20, "bptt": bptt, "epochs": epochs,
        "max_tokens": 0, "optimizer": "sgd", "lr": 1.0, "loss": "time_sum",
        "schedule": "decay", "lr_decay": lr_decay, "decay_after": decay_after, "clip": clip,
        "forget_bias": 0.0,  # the TensorFlow tutorial's BasicLSTMCell(forget_bias=0.0)
        "vocab_size": 10_000,
    }
    return Reference(
        "ptb", "lstm2",
        f"2-layer LSTM {units}, {no_dropout}, untied, {epochs} epochs, unroll {bptt}, "
        f"SGD lr 1 / {lr_decay:g} per epoch after {decay_after}, clip {clip:g}",
        valid, test, f"Zaremba et al. 2014 ({size}); TensorFlow tutorial {tensorflow}",
        LAST_EPOCH, settings)


def _wlm(epochs: int, test: float) -> Reference:
    """PyTorch's word_language_model at commit 30b9c0e, `main.py --epochs <epochs> --tied`
    (its README's PTB test perplexity), every other setting its main.py default."""
    settings = {
        "embedding_size": 200, "hidden_size": 200, "dropout": 0.2, "tie_weights": True,
        "batch_size": 20, "bptt": 35, "epochs": epochs, "max_tokens": 0,
        # one validation an epoch, as its plateau rule and its selection read
        "evals_per_epoch": 1, "optimizer": "sgd",
        # in time_sum units, as every reference (in_time_sum_units): its lr 20 and clip
        # 0.25 per token are 20 / 35 and 0.25 x 35
        "lr": 20 / 35, "loss": "time_sum", "clip": 0.25 * 35,
        "schedule": "plateau", "lr_decay": 4.0, "plateau_threshold": 0.0,
        "stop_after_plateaus": 0, "forget_bias": 0.0, "vocab_size": 10_000,
    }
    return Reference(
        "ptb", "lstm2",
        f"2-layer LSTM 200, tied, dropout 0.2, {epochs} epochs, unroll 35, "
        "SGD lr 20 / 4 after an epoch without improvement, clip 0.25", None, test,
        f"PyTorch word_language_model README at commit 30b9c0e (main.py --epochs {epochs} "
        "--tied)", BEST_EPOCH_END, settings)


REFERENCES: tuple[Reference, ...] = (
    Reference("ptb", "kn5", "Kneser-Ney 5-gram, V = 10,000", None, 141.2,
              "Mikolov & Zweig 2012; Mikolov 2012 thesis, table 4.1", ONE_MODEL,
              {"order": 5, "vocab_size": 10_000, "discount_fallback": False}),
    Reference("ptb", "window", "feed-forward NNLM", None, 140.2, "Mikolov 2012 thesis",
              NOT_PUBLISHED,
              not_comparable=CONFIG_NOT_PUBLISHED),
    Reference("ptb", "rnn", "RNN", None, 124.7, "Mikolov & Zweig 2012", NOT_PUBLISHED,
              not_comparable=CONFIG_NOT_PUBLISHED),
    # (its RNN with 100 hidden units, 137 / 129, is not listed: the rnn row shows one
    # context reference, Mikolov & Zweig's above)
    Reference("ptb", "lstm", "LSTM, 100 hidden units", 120, 115,
              "Mikolov et al. 2014 (SCRN), quoted in Joulin & Mikolov 2015, table 4",
              NOT_PUBLISHED, not_comparable="a smaller model (100 hidden units), "
              "configuration not published in full"),
    Reference("ptb", "gru", "GRU, about 13M parameters, tied, SGD", None, 92.48,
              "Bai et al. 2018, table 1", NOT_PUBLISHED,
              not_comparable="a larger model (about 13M parameters), "
              "configuration not published in full"),
    _zaremba("small", units=200, dropout=0.0, init_range=0.1, bptt=20, epochs=13,
             lr_decay=2.0, decay_after=4, clip=5.0, valid=120.7, test=114.5,
             tensorflow="121.39 / 115.91"),
    _zaremba("medium", units=650, dropout=0.5, init_range=0.05, bptt=35, epochs=39,
             lr_decay=1.2, decay_after=6, clip=5.0, valid=86.2, test=82.7,
             tensorflow="86.16 / 82.07"),
    _zaremba("large", units=1500, dropout=0.65, init_range=0.04, bptt=35, epochs=55,
             lr_decay=1.15, decay_after=14, clip=10.0, valid=82.2, test=78.4,
             tensorflow="82.62 / 78.29"),
    _wlm(epochs=6, test=110.44),
    _wlm(epochs=40, test=87.17),
    *(Reference("brown", f"kn{order}", f"Kneser-Ney back-off {order}-gram (SRILM), V = 16,383",
                valid, test, "Bengio et al. 2003, table 1", ONE_MODEL,
                not_comparable=BENGIO_BROWN)
      for order, valid, test in ((3, 334, 323), (4, 332, 321), (5, 332, 321))),
    Reference("brown", "window", "MLP n=5, h=100, m=30, no direct connections (MLP9), "
              "V = 16,383", 280, 276, "Bengio et al. 2003, table 1", NOT_PUBLISHED,
              not_comparable=BENGIO_BROWN),
)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """A numpy scalar (from a DataFrame) as the Python value a JSON file would give."""
    return value.item() if hasattr(value, "item") else value


def in_time_sum_units(settings: dict[str, Any]) -> dict[str, Any]:
    """The same settings with an SGD token_mean lr and clip restated in time_sum units.

    With plain SGD the two losses give the same step when lr(time_sum) = lr(token_mean) / bptt
    and clip(time_sum) = clip(token_mean) x bptt (the loss is bptt times larger), so PyTorch's
    lr 20 / clip 0.25 at unroll 20 is Zaremba's lr 1 / clip 5. Other optimizers are left alone.
    """
    if (settings.get("loss") != "token_mean" or settings.get("optimizer") != "sgd"
            or not settings.get("bptt") or "lr" not in settings or "clip" not in settings):
        return settings
    bptt = settings["bptt"]
    return {**settings, "loss": "time_sum", "lr": settings["lr"] / bptt,
            "clip": settings["clip"] * bptt}


# settings added after runs were committed: the value that behaves as the code before
ADDED_SETTINGS = {"forget_bias": 0.0, "plateau_threshold": 0.0, "stop_after_plateaus": 0}


def row_settings(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """A metrics row's resolved settings, or None when it records none.

    A neural row: its `config` (a dict, or the JSON of one as in leaderboard.csv) plus
    ROW_FIELDS; an n-gram row: ROW_FIELDS (it has an `order`). A neural row from before
    metrics files carried `config` gets None: it matches no reference.
    """
    config = row.get("config")
    if isinstance(config, str) and config:
        config = json.loads(config)
    if not isinstance(config, dict) and not _present(row.get("order")):
        return None
    settings = dict(config) if isinstance(config, dict) else {}
    if isinstance(config, dict):  # a run from before a setting existed had this effect
        settings = {**ADDED_SETTINGS, **settings}
    settings.update({k: _plain(row[k]) for k in ROW_FIELDS if _present(row.get(k))})
    return in_time_sum_units(settings)


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):  # True must not equal 1
        return isinstance(ours, bool) and isinstance(theirs, bool) and ours == theirs
    if isinstance(ours, int | float) and isinstance(theirs, int | float):
        return math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=1e-12)
    return ours == theirs


def differences(reference: Reference, settings: Mapping[str, Any] | None) -> list[str]:
    """The settings the reference requires that the row lacks or sets otherwise."""
    settings = settings or {}
    return [key for key, value in reference.settings.items()
            if key not in settings or not _same(settings[key], value)]


def protocol_figure(row: Mapping[str, Any], protocol: str) -> float | None:
    """Our test perplexity under `protocol`, or None when the row records none: an n-gram
    row's own (ONE_MODEL); a neural row's from its `protocols` (a dict, or its JSON as in
    leaderboard.csv), as the train stage records them."""
    if protocol == ONE_MODEL:
        ngram = _present(row.get("order"))
        return float(row["test_ppl"]) if ngram and _present(row.get("test_ppl")) else None
    protocols = row.get("protocols")
    if isinstance(protocols, str) and protocols:
        protocols = json.loads(protocols)
    figure = (protocols.get(protocol) or {}).get("test_ppl") \
        if isinstance(protocols, dict) else None
    return float(figure) if _present(figure) else None


def protocols_note() -> str:
    """One line: whose test perplexity each reference reports, and which figure of ours
    "ours − published" uses."""
    models: dict[str, dict[str, list[str]]] = {}  # protocol -> author -> our model kinds
    for reference in REFERENCES:  # in the order of REFERENCES
        author = reference.source.split(";")[0].split(",")[0].split(" (")[0]
        kinds = models.setdefault(reference.protocol, {}).setdefault(author, [])
        kinds += [] if reference.model in kinds else [reference.model]
    said = "; ".join(
        f"{protocol}{' (context only)' if protocol == NOT_PUBLISHED else ''}: "
        + ", ".join(f"{author} ({', '.join(kinds)})" for author, kinds in models[protocol].items())
        for protocol in PROTOCOLS if protocol in models)
    return ("Whose test perplexity each reference reports (its selection protocol): " + said
            + ". Our \"test ppl\" is the best validation point's (mid-epoch points "
            "included); \"ours − published\" uses our figure under the reference's protocol.")


def references_for(corpus: str, model: str) -> list[Reference]:
    return [r for r in REFERENCES if r.corpus == corpus and r.model == model]


def _context_note(reference: Reference, settings: Mapping[str, Any] | None,
                  differing: list[str]) -> str:
    if reference.not_comparable:
        return reference.not_comparable
    if settings is None:
        return "our row records no configuration (a metrics file from before `config`)"
    return "measured with another configuration (ours differs in " + ", ".join(differing) + ")"


def compare(row: Mapping[str, Any]) -> Comparison:
    """The reference to show beside a metrics row (`corpus`, `model`, `config`, ROW_FIELDS,
    `protocols`), and whether it is a match: the reference's configuration, and our figure
    under its protocol recorded. A configuration match wins; else the nearest context one
    (the fewest differing settings, then the order of REFERENCES); else no reference."""
    candidates = references_for(row["corpus"], row["model"])
    if not candidates:
        return Comparison(None, match=False)
    settings = row_settings(row)
    ranked = sorted(((bool(r.not_comparable), len(differences(r, settings)), i, r)
                     for i, r in enumerate(candidates)), key=lambda t: t[:3])
    not_comparable, distance, _, best = ranked[0]
    ours = protocol_figure(row, best.protocol)
    if not not_comparable and settings is not None and distance == 0:
        if ours is None:  # the same configuration, but not the paper's selection
            return Comparison(best, match=False, note=(
                f"same configuration, but our run records no test perplexity under its "
                f"protocol ({best.protocol})"))
        return Comparison(best, match=True, ours=ours)
    return Comparison(best, match=False,
                      note=_context_note(best, settings, differences(best, settings)))
