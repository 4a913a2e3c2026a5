"""Selection protocols: "ours − published" compares the figure the paper's own protocol gives.

A published test perplexity is that of one model of a run: the last epoch's (Zaremba et
al.), the best end-of-epoch validation point's (PyTorch's word_language_model), or an
n-gram's only one. The train stage records ours under each protocol (metrics
`protocols`); the leaderboard prints a difference only from the figure under the
reference's protocol, never from our best validation point's.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline import neural
from pipeline.leaderboard_table import build_table, make_reproductions, render_markdown
from pipeline.page import render_table
from pipeline.references import (
    BEST_EPOCH_END,
    LAST_EPOCH,
    NOT_PUBLISHED,
    ONE_MODEL,
    PROTOCOLS,
    REFERENCES,
    ROW_FIELDS,
    Reference,
    compare,
)
from tests.test_references import metrics_row
from tests.test_robustness import params, write_corpus

REPO = Path(__file__).resolve().parents[1]
ZAREMBA_SMALL = REPO / "reports" / "reproductions" / "zaremba-small"


def test_every_reference_names_its_protocol():
    assert {r.protocol for r in REFERENCES} <= set(PROTOCOLS)
    zaremba = [r for r in REFERENCES if r.source.startswith("Zaremba")]
    assert len(zaremba) == 3 and {r.protocol for r in zaremba} == {LAST_EPOCH}
    wlm = [r for r in REFERENCES if r.source.startswith("PyTorch word_language_model")]
    assert [r.test for r in wlm] == [110.44, 87.17]
    assert {r.protocol for r in wlm} == {BEST_EPOCH_END}
    assert all(r.protocol == ONE_MODEL for r in REFERENCES if r.model.startswith("kn"))
    assert all(r.not_comparable for r in REFERENCES if r.protocol == NOT_PUBLISHED)
    with pytest.raises(ValueError, match="not published is context only"):
        Reference("ptb", "rnn", "RNN", None, 124.7, "someone", NOT_PUBLISHED)
    with pytest.raises(ValueError, match="unknown protocol 'best validation'"):
        Reference("ptb", "rnn", "RNN", None, 124.7, "someone", "best validation")


def test_the_train_stage_records_under_the_names_references_compare():
    assert (neural.LAST_EPOCH, neural.BEST_EPOCH_END) == (LAST_EPOCH, BEST_EPOCH_END)


def row_for(reference: Reference, test_ppl: float, recorded: dict[str, float]) -> dict:
    """A metrics row that ran exactly the reference's configuration, with our test ppl
    (the best validation point's) and the figures recorded under `recorded` protocols."""
    settings = dict(reference.settings)
    row = {"corpus": reference.corpus, "model": reference.model, "preset": "x",
           **{k: settings.pop(k) for k in ROW_FIELDS if k in settings}}
    if "order" not in row:
        row |= {"family": "neural", "config": settings,
                "protocols": {p: {"test_ppl": ppl} for p, ppl in recorded.items()}}
    return metrics_row(row, test_ppl)


def printed_differences(rows: list[dict]) -> list[str]:
    """The "ours − published" cells that hold a difference, in the Markdown page and in the
    HTML table (read back from the CSV, as the report stage does)."""
    table = build_table(pd.DataFrame(rows))
    lines = [[c.strip() for c in line.split("|")[1:-1]]
             for line in render_markdown(table).splitlines() if line.startswith("| ")]
    column = lines[0].index("ours − published")
    cells = [cells[column] for cells in lines[1:]]
    page = render_table(pd.read_csv(io.StringIO(table.to_csv(index=False))))
    head, body = page.split("</thead>")
    column = re.findall(r"<th>(.*?)</th>", head).index("ours − published")
    cells += [re.findall(r"<td>(.*?)</td>", tr)[column]
              for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]
    return [c for c in cells if c and not c.startswith("context:")]


@pytest.mark.parametrize("reference", REFERENCES, ids=lambda r: f"{r.source[:24]}"
                         f"-{r.model}-{r.test}")
def test_a_difference_only_under_the_references_protocol(reference):
    selecting = (LAST_EPOCH, BEST_EPOCH_END)
    for n in range(len(selecting) + 1):
        for recorded in itertools.combinations(selecting, n):
            figures = {p: 130.0 + 7 * i for i, p in enumerate(recorded)}
            row = row_for(reference, 100.0, figures)  # 100: ours, best validation point
            assert compare(row).reference == reference
            printed = printed_differences([row])
            if reference.not_comparable or reference.protocol == NOT_PUBLISHED:
                assert printed == []
            elif reference.protocol == ONE_MODEL:  # an n-gram: its test ppl is the figure
                assert printed == [f"{100.0 - reference.test:.2f}"] * 2
            elif reference.protocol in figures:
                ours = figures[reference.protocol]
                assert printed == [f"{ours - reference.test:.2f} (ours at the "
                                   f"{reference.protocol}: {ours:.2f})"] * 2
            else:  # the run did not follow the paper's protocol: no difference
                assert printed == [], (reference.source, recorded)
                assert f"no test perplexity under its protocol ({reference.protocol})" \
                    in compare(row).note


def committed_small() -> dict:
    return json.loads((ZAREMBA_SMALL / "metrics.json").read_text())


def test_zaremba_small_is_compared_at_its_last_epoch():
    metrics = committed_small()
    last = metrics["protocols"][LAST_EPOCH]
    curve = json.loads((ZAREMBA_SMALL / "curve.json").read_text())
    assert (last["epoch"], last["step"]) == (13.0, curve[-1]["step"])  # the run's last point
    found = compare(metrics)
    assert found.match and found.reference.source.startswith("Zaremba et al. 2014 (small)")
    assert found.ours == last["test_ppl"] != metrics["test_ppl"]
    assert found.difference() == round(last["test_ppl"] - 114.5, 2)
    assert found.difference() != round(metrics["test_ppl"] - 114.5, 2)
    without = metrics | {"protocols": {BEST_EPOCH_END: metrics["protocols"][BEST_EPOCH_END]}}
    assert not compare(without).match and compare(without).difference() is None


def test_the_committed_reproductions_page_is_rendered_from_the_metrics(tmp_path):
    made = make_reproductions(ZAREMBA_SMALL.parent, tmp_path / "page.md")
    page = (tmp_path / "page.md").read_text()
    assert page == (ZAREMBA_SMALL.parent / "leaderboard.md").read_text()
    row = made.set_index("run").loc["zaremba-small"]
    last = committed_small()["protocols"][LAST_EPOCH]["test_ppl"]
    assert row["protocol_test_ppl"] == last and row["ref_protocol"] == LAST_EPOCH
    cell = f"| {last - 114.5:.2f} (ours at the last epoch: {last:.2f}) |"
    assert page.count(cell) == 1 and "| zaremba-small: lstm2 |" in page
    assert "last epoch: Zaremba et al. 2014" in page


# --- the train stage: which point each protocol selects, which weights score it --------


def curve(*valid: tuple[float, float]) -> list[dict]:
    """Curve points (epoch, valid ppl) of a run with 10 steps per epoch."""
    return [{"step": round(epoch * 10), "epoch": epoch, "valid_ppl": ppl}
            for epoch, ppl in valid]


class Scorer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return 150.0


def test_the_committed_curve_selects_the_last_epoch_for_both_protocols():
    history = json.loads((ZAREMBA_SMALL / "curve.json").read_text())
    metrics = committed_small()
    spe = next(r["step"] for r in history if r["epoch"] == 1.0)
    scorer = Scorer()
    found = neural.protocol_scores(history, spe, metrics["best_step"], metrics["test_ppl"],
                                  scorer)
    assert scorer.calls == 1  # the last point's weights scored once, for both protocols
    assert found[LAST_EPOCH] == found[BEST_EPOCH_END] == {
        "step": 30212, "epoch": 13.0, "valid_ppl": round(history[-1]["valid_ppl"], 4),
        "test_ppl": 150.0}
    assert metrics["best_epoch"] == 6.5  # the suite's own best: a mid-epoch point


def test_an_epoch_end_that_no_checkpoint_keeps_has_no_test_figure():
    # best point 1.5 (mid-epoch, best.pt); best epoch end 1.0 (neither best nor last)
    history = curve((0.5, 200), (1.0, 150), (1.5, 140), (2.0, 160))
    scorer = Scorer()
    found = neural.protocol_scores(history, 10, 15, 135.0, scorer)
    assert found[BEST_EPOCH_END] == {"step": 10, "epoch": 1.0, "valid_ppl": 150,
                                     "test_ppl": None}
    assert found[LAST_EPOCH]["test_ppl"] == 150.0 and scorer.calls == 1


def test_an_epoch_end_best_uses_the_published_checkpoint_and_a_cut_run_has_no_last_epoch():
    scorer = Scorer()
    found = neural.protocol_scores(curve((1.0, 150), (2.0, 140)), 10, 20, 135.0, scorer)
    assert found[LAST_EPOCH]["test_ppl"] == found[BEST_EPOCH_END]["test_ppl"] == 135.0
    assert scorer.calls == 0
    cut = neural.protocol_scores(curve((1.0, 150), (1.5, 140)), 10, 15, 135.0, scorer)
    assert set(cut) == {BEST_EPOCH_END} and cut[BEST_EPOCH_END]["test_ppl"] is None
    assert neural.protocol_scores(curve((0.5, 150)), 10, 5, 135.0, scorer) == {}
    assert scorer.calls == 0


@pytest.fixture(scope="module")
def ptb_lines(tmp_path_factory, mirror) -> Path:
    """The first 120 / 20 / 20 lines of real PTB, prepared as a custom corpus."""
    from pipeline.encoding import prepare_corpus

    root = tmp_path_factory.mktemp("ptb-lines")
    parts = {s: (mirror / "ptb" / f"ptb.{s}.txt").read_text().splitlines()[:n]
             for s, n in (("train", 120), ("valid", 20), ("test", 20))}
    prepare_corpus("custom", write_corpus(root / "raw", parts), root / "out", params("word"))
    return root / "out"


def test_the_stage_scores_the_last_epoch_from_the_final_weights(ptb_lines, tmp_path):
    """On real PTB lines: the last epoch's figures are those of the weights at the end of
    training (the final resume point), scored by the one scorer."""
    from pipeline.checkpoints import load_checkpoint
    from pipeline.dataset import PreparedCorpus
    from pipeline.networks import LanguageModel, NetworkConfig
    from pipeline.perplexity import score_stream
    from tests.test_faults import small_train_params

    # a constant lr 0.1 over-fits these 120 lines: the best point is epoch 2's (measured)
    params = small_train_params(epochs=4, evals_per_epoch=2, lr=0.1, dropout=0.0,
                                schedule="decay", lr_decay=1.0)
    metrics = neural.train_and_score("custom", "window", ptb_lines, tmp_path / "ckpt",
                                    tmp_path / "m.pt", tmp_path / "curve.json", params)
    history = json.loads((tmp_path / "curve.json").read_text())
    last = metrics["protocols"][LAST_EPOCH]
    assert last["step"] == history[-1]["step"] != metrics["best_step"]  # overfits: not best
    final = LanguageModel(NetworkConfig(**load_checkpoint(tmp_path / "m.pt")["network"]))
    final.load_state_dict(load_checkpoint(tmp_path / "ckpt" / "last.pt")["model"])
    data = PreparedCorpus(ptb_lines)
    valid = score_stream(final, data.ids("valid"), params.eval_chunk, 0)
    test = score_stream(final, data.ids("test"), params.eval_chunk, 0)
    assert valid.perplexity == pytest.approx(last["valid_ppl"], rel=1e-6)  # the curve's point
    assert last["test_ppl"] == round(test.perplexity, 4) != metrics["test_ppl"]
    epoch_end = metrics["protocols"][BEST_EPOCH_END]  # the best point is an epoch end
    assert (epoch_end["step"], epoch_end["test_ppl"]) == (metrics["best_step"],
                                                          metrics["test_ppl"])
