"""The leaderboard table: every model's metrics file -> one table per corpus, with its
references, floors and renderings (the `leaderboard` stage's work,
pipeline/stages/leaderboard.py; the report stage renders the same cells).

Which rows exist is decided by the params that decide which models are built
(`corpora`, `ngram.orders`, `train.models`): a metrics file left behind by a model no longer
configured is ignored, and a configured model without one is an error.
Rows are sorted by test perplexity. The token counts of all models of a corpus
must agree (the perplexity contract); a disagreement fails the stage rather than
publishing numbers that are not comparable. leaderboard.json is declared as DVC
metrics, so `dvc metrics show` and `dvc exp show` list every test perplexity.
A corpus generated from a known source (`synthetic`) also gets its floor: the
source's entropy rate as a perplexity, the best any model can expect, and the
source's own perplexity on the very test sentences.
A published reference is shown beside the row it speaks of; "ours − published" only
where the row ran its configuration and recorded its figure under the reference's
selection protocol (pipeline/references.py decides), from that figure; otherwise the
published figure is context with the reason it is not comparable.

The committed reproductions (reports/reproductions/<run>/metrics.json, written by
`make reproduce-small` and the like, outside the DVC pipeline) get the same table:

    python -m pipeline.stages.leaderboard --reproductions reports/reproductions \
        --out-md reports/reproductions/leaderboard.md
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.atomic import write_json, write_text
from pipeline.dataset import PreparedCorpus
from pipeline.errors import UserError
from pipeline.references import (
    ADDED_SETTINGS,
    ONE_MODEL,
    REFERENCES_NOTE,
    compare,
    protocols_note,
)

COLUMNS = [
    "corpus", "model", "family", "description", "size", "size_unit", "valid_ppl", "test_ppl",
    "valid_bpc", "test_bpc", "valid_tokens", "test_tokens", "train_seconds", "tokens_per_s",
    "train_tokens", "epochs", "device", "precision", "preset", "config", "protocols",
    "ref_valid_ppl", "ref_test_ppl", "test_ppl_minus_ref", "ref_description", "ref_source",
    "ref_match", "ref_note", "ref_protocol", "protocol_test_ppl",
    "floor_ppl", "source_test_ppl",
]
SCORING_NOTE = (
    "Perplexity = exp(total NLL / tokens) over the whole split, every end of sentence "
    "predicted and counted. N-grams score each sentence from KenLM's `<s>` context; "
    "neural models read each split as one stream with their state carried across batches."
)


class LeaderboardError(UserError, RuntimeError):
    pass


def load_metrics(metrics_dir: Path, models: dict[str, list[str]]) -> pd.DataFrame:
    rows = []
    for corpus, names in models.items():
        for name in names:
            path = metrics_dir / corpus / f"{name}.json"
            if not path.exists():
                raise LeaderboardError(f"{corpus}/{name} is configured but {path} is missing")
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    if not rows:
        raise LeaderboardError("no models configured: params `corpora` is empty")
    return pd.DataFrame(rows)


def load_floors(prepared_dir: Path, corpora: list[str]) -> dict[str, dict]:
    """corpus -> its known source's figures (pipeline/synthetic.py), where it has one."""
    floors = {}
    for corpus in corpora:
        source = PreparedCorpus(prepared_dir / corpus).meta.get("source")
        if source:
            floors[corpus] = source
    return floors


def build_table(metrics: pd.DataFrame, floors: dict[str, dict] | None = None,
                keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """The leaderboard's rows (COLUMNS, plus the metrics' `keep` columns), checked: one
    vocabulary and one token count per split for every model of a corpus."""
    for corpus, group in metrics.groupby("corpus"):
        if group["vocab_digest"].nunique() != 1:
            raise LeaderboardError(
                f"{corpus}: models were built on different vocabularies "
                f"({group.set_index('model')['vocab_digest'].to_dict()}); rerun the pipeline"
            )
        for split in ("valid", "test"):
            counts = group.set_index("model")[f"{split}_tokens"]
            if counts.nunique() != 1:
                raise LeaderboardError(
                    f"{corpus}: {split} token counts differ between models "
                    f"({counts.to_dict()}); their perplexities are not comparable"
                )
    table = metrics.copy()
    add_references(table)
    for column in ("config", "protocols"):  # as JSON cells
        table[column] = [config_json(c) for c in table.get(column, [None] * len(table))]
    floors = floors or {}
    table["floor_ppl"] = pd.to_numeric([floors.get(c, {}).get("floor_ppl")
                                        for c in table["corpus"]])
    table["source_test_ppl"] = pd.to_numeric(
        [floors.get(c, {}).get("ppl_per_split", {}).get("test") for c in table["corpus"]])
    for column in COLUMNS:
        if column not in table:
            table[column] = None
    return (table[COLUMNS + list(keep)].sort_values(["corpus", "test_ppl"], kind="stable")
            .reset_index(drop=True))


def add_references(table: pd.DataFrame) -> None:
    """The reference columns, in place: ref_valid_ppl / ref_test_ppl (published perplexities),
    ref_description (its model and configuration), ref_source, ref_protocol (whose test
    perplexity it reports), ref_match (our row ran that configuration and recorded its figure
    under that protocol), ref_note (why not, for a context reference), protocol_test_ppl (our
    figure under the protocol) and test_ppl_minus_ref (that figure − published, matches only)."""
    comparisons = [compare(row) for row in table.to_dict("records")]
    refs = [c.reference for c in comparisons]
    table["ref_valid_ppl"] = pd.to_numeric([r.valid if r else None for r in refs])
    table["ref_test_ppl"] = pd.to_numeric([r.test if r else None for r in refs])
    table["ref_description"] = [r.description if r else "" for r in refs]
    table["ref_source"] = [r.source if r else "" for r in refs]
    table["ref_match"] = [c.match for c in comparisons]
    table["ref_note"] = [c.note for c in comparisons]
    table["ref_protocol"] = [r.protocol if r else "" for r in refs]
    table["protocol_test_ppl"] = pd.to_numeric([c.ours for c in comparisons])
    table["test_ppl_minus_ref"] = pd.to_numeric([c.difference() for c in comparisons])


def config_json(config) -> str:
    """A row's resolved settings (or protocol figures) as one CSV cell (JSON, keys sorted);
    "" when it has none."""
    return json.dumps(config, sort_keys=True) if isinstance(config, dict) else ""


def reference_cells(row) -> tuple[str, str]:
    """("published test ppl (source)", "ours − published") for a leaderboard row: the
    difference only for a match, with our figure under the reference's protocol where that
    is not the row's own test ppl (an n-gram's is); "context: <why not comparable>" for
    another reference."""
    if pd.isna(row.ref_test_ppl):
        return "", ""
    published = f"{_fmt(row.ref_test_ppl, 1)} ({row.ref_description}; {row.ref_source})"
    if not row.ref_match:
        return published, f"context: {row.ref_note}"
    if row.ref_protocol == ONE_MODEL:
        return published, _fmt(row.test_ppl_minus_ref)
    return published, (f"{_fmt(row.test_ppl_minus_ref)} (ours at the {row.ref_protocol}: "
                       f"{_fmt(row.protocol_test_ppl)})")


def _fmt_budget(tokens, epochs) -> str:
    """Training tokens and epochs: "1,859,160 (2)", or "500,500 (0.54)" for a run stopped
    inside an epoch; "" for a model that is counted, not trained (an n-gram)."""
    if epochs is None or pd.isna(epochs):
        return ""
    counted = "" if tokens is None or pd.isna(tokens) else f"{int(tokens):,} "
    return f"{counted}({round(float(epochs), 2):g})"


def _fmt_device(row) -> str:
    """"cpu, bf16 autocast": where the model trained and in what arithmetic."""
    training = str(row.precision).split(",")[0].removeprefix("training ") \
        if isinstance(row.precision, str) else ""
    return ", ".join(part for part in (row.device or "", training) if part)


def verdict(group: pd.DataFrame) -> str:
    """One sentence on a corpus, drawn from its rows: the best neural model against the
    best n-gram (test perplexity), and how many neural models beat that n-gram; "" where
    the corpus lacks either family."""
    neural = group[group["family"] == "neural"].sort_values("test_ppl")
    ngram = group[group["family"] == "ngram"].sort_values("test_ppl")
    if neural.empty or ngram.empty:
        return ""
    best, kn = neural.iloc[0], ngram.iloc[0]
    change = best["test_ppl"] / kn["test_ppl"] - 1
    ahead = int((neural["test_ppl"] < kn["test_ppl"]).sum())
    lead = "leads" if change < 0 else "trails"
    return (f"**{best['model']} {lead} the best n-gram**: test {best['test_ppl']:.2f} against "
            f"{kn['model']}'s {kn['test_ppl']:.2f} ({change:+.1%}); {ahead} of {len(neural)} "
            f"neural models score below {kn['model']}.")


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_markdown(table: pd.DataFrame, title: str = "Leaderboard", intro: str = "",
                    committed: pd.DataFrame | None = None) -> str:
    """The page: one table per corpus; then, given `committed` (load_committed), the
    committed runs under COMMITTED_HEADING, one table per corpus again."""
    out = [f"# {title}", "", *([intro, ""] if intro else []), SCORING_NOTE, "", REFERENCES_NOTE,
           "", protocols_note(), ""]
    out += corpus_sections(table, level="##")
    if committed is not None:
        out += [f"## {COMMITTED_HEADING}", "", COMMITTED_INTRO, ""]
        out += corpus_sections(committed, level="###")
    return "\n".join(out)


def corpus_sections(table: pd.DataFrame, level: str) -> list[str]:
    """One heading and table per corpus. A row's first cell is its model, or "<run>: <model>"
    followed by its configuration where the table has a `run` column (committed runs)."""
    runs = "run" in table
    out: list[str] = []
    for corpus, group in table.groupby("corpus", sort=False):
        char = group["test_bpc"].notna().any()
        out += [f"{level} {corpus}", ""]
        for line in (floor_note(group), verdict(group)):
            out += [line, ""] if line else []
        header = ["run: model", "configuration"] if runs else ["model"]
        header += ["size", "valid ppl", "test ppl"] + (["test bpc"] if char else [])
        header += ["tokens (valid / test)", "train time (s)", "train tok/s",
                   "training budget: tokens (epochs)", "device, training",
                   "published test ppl (source)", "ours − published"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in group.itertuples():
            size = f"{_fmt(int(row.size))} {row.size_unit}" if pd.notna(row.size) else ""
            published, difference = reference_cells(row)
            cells = [f"{row.run}: {row.model}", describe_config(row.config, row.model)] \
                if runs else [row.model]
            cells += [size, _fmt(row.valid_ppl), _fmt(row.test_ppl)]
            cells += [_fmt(row.test_bpc, 3)] if char else []
            cells += [f"{_fmt(int(row.valid_tokens))} / {_fmt(int(row.test_tokens))}",
                      _fmt(row.train_seconds, 1), _fmt(row.tokens_per_s, 0),
                      _fmt_budget(row.train_tokens, row.epochs), _fmt_device(row),
                      published, difference]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def describe_config(config: str, model: str) -> str:
    """A neural run's resolved settings (a `config` cell, JSON) in a few words: sizes,
    regularisation, optimizer and schedule, unroll and batch, epochs; "" without one.
    lr and clip are in the unit of the run's `loss`."""
    if not config:
        return ""
    c = {**ADDED_SETTINGS, **json.loads(config)}  # a run from before a setting: its effect
    sizes = f"{c['embedding_size']}/{c['hidden_size']}"
    sizes += f", context {c['context']}" if model == "window" else ""
    schedule = {"plateau": _plateau_rule(c),
                "decay": f"/ {c['lr_decay']:g} per epoch after {c['decay_after']}",
                "cosine": f"cosine to x {c['lr_min']:g}"}[c["schedule"]]
    optimizer = "SGD" if c["optimizer"] == "sgd" else "Adam"
    return (f"{sizes}, {'tied' if c['tie_weights'] else 'untied'}, dropout {c['dropout']:g}; "
            f"{optimizer} lr {c['lr']:g} ({c['loss'].replace('_', ' ')}) {schedule}, "
            f"clip {c['clip']:g}; unroll {c['bptt']}, batch {c['batch_size']}, "
            f"{c['epochs']} epochs at most")


def _plateau_rule(c: dict) -> str:
    """The plateau schedule of a resolved config in words."""
    threshold, stop = c["plateau_threshold"], c["stop_after_plateaus"]
    epoch = f"an epoch that gained under {threshold * 100:g}%" if threshold \
        else "an epoch without improvement"
    ends = f", ending at the {_ordinal(stop)} such epoch" if stop else ""
    return f"/ {c['lr_decay']:g} after {epoch}{ends}"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def floor_note(group: pd.DataFrame) -> str:
    """One line on a corpus's known floor, or "" when it has none."""
    row = group.iloc[0]
    if pd.isna(row["floor_ppl"]):
        return ""
    return (f"Best achievable perplexity: {row['floor_ppl']:.3f}, the entropy rate of the "
            "source that generated this corpus (computed exactly). The source itself scores "
            f"test ppl {row['source_test_ppl']:.3f} on these test sentences.")


def dvc_metrics(table: pd.DataFrame) -> dict:
    """{corpus: {model: {valid_ppl, test_ppl}}}: the shape `dvc metrics show` flattens
    (plus `floor_ppl` for a corpus with a known source)."""
    nested: dict = {}
    for row in table.itertuples():
        nested.setdefault(row.corpus, {})[row.model] = {
            "valid_ppl": row.valid_ppl, "test_ppl": row.test_ppl}
        if pd.notna(row.floor_ppl):
            nested[row.corpus]["floor_ppl"] = row.floor_ppl
    return nested


def make_leaderboard(metrics_dir: Path, prepared_dir: Path, models: dict[str, list[str]],
                     out_md: Path, out_csv: Path, out_json: Path,
                     committed: Path | None = None) -> pd.DataFrame:
    """The pipeline's rows to out_csv, out_json (DVC metrics) and out_md; out_md also shows
    the committed runs of `committed` (<folder>/<run>/metrics.json) when given."""
    table = build_table(load_metrics(metrics_dir, models), load_floors(prepared_dir, list(models)))
    write_text(out_csv, table.to_csv(index=False))
    write_text(out_md, render_markdown(
        table, committed=load_committed(committed) if committed else None))
    write_json(out_json, dvc_metrics(table))
    return table


COMMITTED_HEADING = "Converged and reproduced runs (committed)"
COMMITTED_INTRO = (
    "Runs trained to convergence, or under a published configuration, outside the DVC "
    "pipeline and committed with their learning curves in reports/reproductions/<run>/ "
    "(their commands: README, Reproductions and Converged runs). Each test perplexity is "
    "its best validation point's; a published figure is compared only under its own "
    "configuration and selection protocol, and is context otherwise.")
REPRODUCTIONS_INTRO = (
    "Committed runs of a published configuration, outside the DVC pipeline (their commands "
    "are in the README, Reproductions); each folder of reports/reproductions holds a run's "
    "metrics and learning curve.")


def load_committed(folder: Path) -> pd.DataFrame:
    """The committed runs, folder/<run>/metrics.json, as table rows with a `run` column."""
    paths = sorted(folder.glob("*/metrics.json"))
    if not paths:
        raise LeaderboardError(f"no committed runs in {folder} (expected <run>/metrics.json)")
    metrics = pd.DataFrame([json.loads(p.read_text(encoding="utf-8")) | {"run": p.parent.name}
                            for p in paths])
    return build_table(metrics, keep=("run",))


def make_reproductions(folder: Path, out_md: Path) -> pd.DataFrame:
    """The committed runs, folder/<run>/metrics.json, as one page of their own."""
    table = load_committed(folder)
    write_text(out_md, render_markdown(table, "Reproductions (committed)", REPRODUCTIONS_INTRO))
    return table
