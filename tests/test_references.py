"""Published references: a difference only against the configuration it was measured with."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from pipeline.leaderboard_table import build_table, render_markdown
from pipeline.page import render_table
from pipeline.params import load_section
from pipeline.plots import comparable, plot_curves, plot_published
from pipeline.presets import TrainParams
from pipeline.references import (
    BEST_EPOCH_END,
    LAST_EPOCH,
    REFERENCES,
    compare,
    in_time_sum_units,
)

# Zaremba et al.'s small model as the `small` preset resolves it for PTB lstm2
SMALL = {"embedding_size": 200, "hidden_size": 200, "context": 4, "dropout": 0.0,
         "tie_weights": False, "direct_connections": False, "init_range": 0.1, "batch_size": 20,
         "bptt": 20, "epochs": 13, "max_tokens": 0, "evals_per_epoch": 2, "optimizer": "sgd",
         "lr": 1.0, "loss": "time_sum", "schedule": "decay", "lr_decay": 2.0, "decay_after": 4,
         "warmup": 0.0, "lr_min": 0.0, "clip": 5.0, "seed": 1}
MEDIUM = {**SMALL, "embedding_size": 650, "hidden_size": 650, "dropout": 0.5,
          "init_range": 0.05, "bptt": 35, "epochs": 39, "lr_decay": 1.2, "decay_after": 6}
LARGE = {**MEDIUM, "embedding_size": 1500, "hidden_size": 1500, "dropout": 0.65,
         "init_range": 0.04, "epochs": 55, "lr_decay": 1.15, "decay_after": 14, "clip": 10.0}
# the `quick` preset's lstm2: tied, dropout 0.2, 5 epochs, PyTorch-style lr 20 with cosine decay
QUICK = {**SMALL, "context": 0, "dropout": 0.2, "tie_weights": True, "bptt": 35, "epochs": 5,
         "evals_per_epoch": 4, "lr": 20.0, "loss": "token_mean", "schedule": "cosine",
         "lr_decay": 1.0, "decay_after": 0, "lr_min": 0.05, "clip": 0.25}


def neural(model: str = "lstm2", config: dict | None = None, corpus: str = "ptb",
           test_ppl: float = 120.0, preset: str = "small") -> dict:
    """A neural row whose last epoch is its best point (so its figure under that protocol is
    its test ppl); tests/test_protocols.py covers rows where they differ."""
    row = {"corpus": corpus, "model": model, "family": "neural", "preset": preset,
           "vocab_size": 10_000, "test_ppl": test_ppl,
           "protocols": {LAST_EPOCH: {"test_ppl": test_ppl}}}
    return row if config is None else {**row, "config": config}


def ngram(order: int, corpus: str = "ptb", vocab_size: int = 10_000,
          discount_fallback: bool = False) -> dict:
    return {"corpus": corpus, "model": f"kn{order}", "family": "ngram", "order": order,
            "vocab_size": vocab_size, "discount_fallback": discount_fallback,
            "test_ppl": 141.19}


def zaremba(size: str):
    return next(r for r in REFERENCES if r.source.startswith(f"Zaremba et al. 2014 ({size})"))


def wlm(epochs: int = 6):
    return next(r for r in REFERENCES if r.source.startswith("PyTorch word_language_model")
                and r.settings["epochs"] == epochs)


def test_quick_lstm2_is_context_for_the_wlm_example_without_difference():
    found = compare(neural(config=QUICK, preset="quick", test_ppl=119.78))
    assert found.reference == wlm()  # tied, dropout 0.2: nearer than any of Zaremba's
    assert not found.match and found.difference() is None
    for setting in ("epochs", "schedule"):
        assert setting in found.note
    assert "embedding_size" not in found.note  # 200 units, like small


@pytest.mark.parametrize(("preset", "epochs", "test"), [("wlm", 6, 110.44), ("wlm40", 40, 87.17)])
def test_each_wlm_preset_matches_its_own_reference(preset, epochs, test):
    """The presets as params.yaml resolves them (wlm40 is wlm's settings merged with 40
    epochs): each is like for like with its README line, and not with the other."""
    spec = load_section("train", TrainParams).spec("ptb", "lstm2", preset=preset)
    found = compare(neural(config=spec.flat(), preset=preset, test_ppl=100.0) | {
        "protocols": {BEST_EPOCH_END: {"test_ppl": 100.0}}})
    assert found.match and found.reference == wlm(epochs) and found.reference.test == test
    assert found.difference() == round(100.0 - test, 2)


@pytest.mark.parametrize(("size", "config", "test"),
                         [("small", SMALL, 114.5), ("medium", MEDIUM, 82.7),
                          ("large", LARGE, 78.4)])
def test_zaremba_preset_matches_its_reference(size, config, test):
    found = compare(neural(config=config, preset=size, test_ppl=116.25))
    assert found.match and found.reference == zaremba(size) and found.note == ""
    assert found.reference.test == test
    assert found.difference() == pytest.approx(116.25 - test, abs=0.005)


@pytest.mark.parametrize("change", [{"epochs": 12}, {"tie_weights": True}, {"dropout": 0.1},
                                    {"max_tokens": 500_000}, {"bptt": 35}, {"hidden_size": 256},
                                    {"optimizer": "adam"}, {"loss": "token_mean"}])
def test_one_changed_setting_breaks_the_match(change):
    found = compare(neural(config={**SMALL, **change}))
    assert not found.match and found.difference() is None
    assert found.reference == zaremba("small")
    assert found.note.startswith("measured with another configuration")


def test_settings_outside_the_experiment_do_not_matter():
    config = {**SMALL, "seed": 7, "evals_per_epoch": 8, "context": 9}
    assert compare(neural(config=config)).match


def test_token_mean_lr_and_clip_are_restated_in_zaremba_units():
    # PyTorch's word_language_model step (lr 20, clip 0.25, mean loss) at unroll 20 is exactly
    # Zaremba small's lr 1 / clip 5 with the loss summed over the unrolled steps
    pytorch = {**SMALL, "loss": "token_mean", "lr": 20.0, "clip": 0.25}
    assert in_time_sum_units(pytorch) == SMALL
    assert compare(neural(config=pytorch)).match
    assert in_time_sum_units({**pytorch, "optimizer": "adam"})["lr"] == 20.0


def test_ptb_kn5_matches_mikolov():
    found = compare(ngram(5))
    assert found.match and found.reference.test == 141.2
    assert found.difference() == pytest.approx(-0.01)


@pytest.mark.parametrize("row", [ngram(5, vocab_size=20_000), ngram(5, discount_fallback=True)])
def test_kn5_on_another_vocabulary_or_discounts_is_context(row):
    found = compare(row)
    assert not found.match and found.reference.test == 141.2 and found.difference() is None


@pytest.mark.parametrize("row", [ngram(3, corpus="brown", vocab_size=14_115),
                                 neural("window", config=SMALL, corpus="brown")])
def test_brown_against_bengio_is_not_comparable(row):
    found = compare(row)
    assert found.reference.source.startswith("Bengio et al. 2003")
    assert not found.match and found.difference() is None
    assert "not comparable" in found.note and "preprocessing" in found.note
    assert "16,383" in found.note


@pytest.mark.parametrize("model", ["rnn", "window"])
def test_mikolov_neural_models_are_context(model):
    found = compare(neural(model, config=SMALL))
    assert not found.match and found.reference.source.startswith("Mikolov")
    assert found.note == "configuration not published in full"


def test_row_without_config_matches_nothing():
    found = compare(neural())  # a metrics file from before `config`
    assert found.reference in (zaremba("small"), wlm()) and not found.match
    assert "no configuration" in found.note


def test_model_without_reference():
    found = compare(neural("lstm", config=SMALL, corpus="wikitext2"))
    assert found.reference is None and not found.match and found.note == ""


def metrics_row(row: dict, test_ppl: float) -> dict:
    """A metrics file's fields as the leaderboard loads them."""
    return {"description": row["model"], "size": 1000, "size_unit": "parameters",
            "valid_ppl": test_ppl + 5, "test_bpc": None, "valid_tokens": 73_760,
            "test_tokens": 82_430, "vocab_digest": "abc", "train_seconds": 10.0,
            "tokens_per_s": 100.0, "epochs": 0.62, "train_tokens": 577_000, "device": "cpu",
            "precision": "training bf16 autocast, scoring fp32", **row, "test_ppl": test_ppl}


@pytest.fixture
def table() -> pd.DataFrame:
    rows = [metrics_row(ngram(5), 141.19), metrics_row(neural(config=QUICK), 119.78),
            metrics_row(neural("lstm", config=QUICK), 125.0)]
    return build_table(pd.DataFrame(rows))


def test_leaderboard_fills_the_difference_only_for_a_match(table):
    by_model = table.set_index("model")
    assert by_model.loc["kn5", "ref_match"] and by_model.loc["kn5", "ref_note"] == ""
    assert by_model.loc["kn5", "test_ppl_minus_ref"] == pytest.approx(-0.01)
    assert not by_model.loc["lstm2", "ref_match"]
    assert pd.isna(by_model.loc["lstm2", "test_ppl_minus_ref"])
    assert by_model.loc["lstm2", "ref_test_ppl"] == 110.44  # shown, as context
    assert "schedule" in by_model.loc["lstm2", "ref_note"]
    # Mikolov et al. 2014's 100-unit LSTM: context only, never a difference
    assert by_model.loc["lstm", "ref_test_ppl"] == 115 and not by_model.loc["lstm", "ref_match"]
    assert pd.isna(by_model.loc["lstm", "test_ppl_minus_ref"])
    assert "100 hidden units" in by_model.loc["lstm", "ref_note"]


def test_markdown_shows_exactly_one_difference(table):
    lines = [[cell.strip() for cell in line.split("|")[1:-1]]
             for line in render_markdown(table).splitlines() if line.startswith("| ")]
    header, rows = lines[0], {cells[0]: dict(zip(lines[0], cells, strict=True))
                              for cells in lines[1:]}
    assert header[-2:] == ["published test ppl (source)", "ours − published"]
    differences = [r["ours − published"] for r in rows.values()]
    assert [d for d in differences if d and not d.startswith("context:")] == ["-0.01"]
    assert rows["kn5"]["ours − published"] == "-0.01"
    assert rows["lstm2"]["ours − published"].startswith(
        "context: measured with another configuration (ours differs in epochs")
    assert "110.4 (2-layer LSTM 200" in rows["lstm2"]["published test ppl (source)"]
    assert rows["lstm"]["ours − published"] == "context: a smaller model (100 hidden units), " \
        "configuration not published in full"
    assert rows["lstm"]["published test ppl (source)"].startswith("115.0 (LSTM, 100 hidden units")
    # training tokens, then epochs (a fraction when stopped early); the training arithmetic
    assert rows["lstm2"]["training budget: tokens (epochs)"] == "577,000 (0.62)"
    assert rows["lstm2"]["device, training"] == "cpu, bf16 autocast"


def test_each_corpus_says_which_family_leads_and_by_how_much(table):
    page = render_markdown(table)
    assert ("**lstm2 leads the best n-gram**: test 119.78 against kn5's 141.19 (-15.2%); "
            "2 of 2 neural models score below kn5.") in page
    behind = table.assign(test_ppl=table["model"].map({"kn5": 141.19, "lstm2": 150.0,
                                                       "lstm": 160.0}))
    assert ("**lstm2 trails the best n-gram**: test 150.00 against kn5's 141.19 (+6.2%); "
            "0 of 2 neural models score below kn5.") in render_markdown(behind)


def test_csv_round_trip_feeds_the_report(table):
    back = pd.read_csv(io.StringIO(table.to_csv(index=False)))
    assert list(back["ref_match"]) == list(table["ref_match"])
    assert '"tie_weights": true' in back.set_index("model").loc["lstm2", "config"]
    assert list(comparable(back)["model"]) == ["kn5"]
    html = render_table(back)
    assert html.count("context: ") == 2 and "<td>-0.01</td>" in html  # lstm2's, lstm's
    fig = plot_published(back)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["ptb/kn5"]


def test_learning_curves_against_tokens_and_minutes(table):
    curve = pd.DataFrame({"step": [10, 20, 30], "epoch": [0.25, 0.5, 0.75],
                          "tokens": [250_000, 500_000, 750_000],
                          "elapsed_s": [60.0, 120.0, 180.0], "valid_ppl": [300.0, 200.0, 150.0]})
    fig = plot_curves("ptb", {"lstm2": curve}, table)
    by_tokens, by_time = fig.axes
    assert list(by_tokens.lines[0].get_xdata()) == [250_000, 500_000, 750_000]
    assert list(by_time.lines[0].get_xdata()) == [1.0, 2.0, 3.0]
    assert [line.get_label() for line in by_time.lines] == ["lstm2", "kn5 (no training curve)"]
    fig.canvas.draw()
    labels = [t.get_text() for t in by_tokens.get_xticklabels() if t.get_text()]
    assert any(label.endswith("k") or label.endswith("M") for label in labels)
