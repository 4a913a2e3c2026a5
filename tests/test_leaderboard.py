"""The leaderboard publishes only comparable perplexities: every model of a corpus predicted
the same tokens of each split, under one vocabulary (the README's perplexity contract).
Otherwise the stage fails with one line naming the corpus and what differs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.errors import run_stage
from pipeline.leaderboard_table import LeaderboardError, build_table, describe_config
from pipeline.params import load_section
from pipeline.presets import TrainParams

# two corpora whose counts differ from each other, as real corpora do: only the models of
# one corpus must agree
COUNTS = {"custom": {"valid_tokens": 7_110, "test_tokens": 7_246, "vocab_digest": "c0ffee"},
          "synthetic": {"valid_tokens": 6_036, "test_tokens": 6_009, "vocab_digest": "5eed"}}


def metrics(**lstm_changes) -> pd.DataFrame:
    """Metrics rows of kn3 and lstm on both corpora; `lstm_changes` apply to custom/lstm."""
    rows = []
    for corpus, counts in COUNTS.items():
        for model, family, ppl in (("kn3", "ngram", 200.0), ("lstm", "neural", 250.0)):
            changes = lstm_changes if (corpus, model) == ("custom", "lstm") else {}
            rows.append({"corpus": corpus, "model": model, "family": family,
                         "valid_ppl": ppl + 10, "test_ppl": ppl, **counts, **changes})
    return pd.DataFrame(rows)


def test_agreeing_models_are_published_corpus_by_corpus():
    table = build_table(metrics())
    assert list(zip(table["corpus"], table["model"], strict=True)) == [
        ("custom", "kn3"), ("custom", "lstm"), ("synthetic", "kn3"), ("synthetic", "lstm")]


@pytest.mark.parametrize("split", ["valid", "test"])
def test_unequal_token_counts_are_refused(split):
    column = f"{split}_tokens"
    broken = metrics(**{column: COUNTS["custom"][column] - 1})  # one <eos> lost, say
    with pytest.raises(LeaderboardError) as refused:
        build_table(broken)
    assert str(refused.value) == (
        f"custom: {split} token counts differ between models "
        f"({{'kn3': {COUNTS['custom'][column]}, 'lstm': {COUNTS['custom'][column] - 1}}}); "
        "their perplexities are not comparable")


def test_unequal_vocabularies_are_refused():
    with pytest.raises(LeaderboardError) as refused:
        build_table(metrics(vocab_digest="another"))  # same counts, another vocabulary
    assert str(refused.value) == ("custom: models were built on different vocabularies "
                                  "({'kn3': 'c0ffee', 'lstm': 'another'}); rerun the pipeline")


def test_the_stage_says_it_in_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        run_stage(lambda: build_table(metrics(test_tokens=1)))
    assert stopped.value.code == 1
    said = capsys.readouterr().err
    assert said.startswith("error: custom: test token counts differ") and said.count("\n") == 1


@pytest.mark.parametrize(("preset", "says"), [
    ("converged", "SGD lr 20 (token mean) / 4 after an epoch that gained under 1%, ending at "
                  "the 4th such epoch, clip 0.25; unroll 35, batch 20, 40 epochs at most"),
    ("wlm", "SGD lr 20 (token mean) / 4 after an epoch without improvement, clip 0.25; "
            "unroll 35, batch 20, 6 epochs at most"),
])
def test_a_committed_run_states_its_schedule_and_stopping_rule(preset, says):
    spec = load_section("train", TrainParams).spec("ptb", "lstm", preset=preset)
    config = json.dumps(spec.flat())  # the cell a metrics file's `config` becomes
    assert describe_config(config, "lstm").endswith(says)
