"""The report's plots, one figure per function, saved as PNG (pipeline/page.py embeds them).

Per corpus: learning curves (validation perplexity against training tokens seen,
the axis that is fair across models, and against training wall time, one line per
neural model), test perplexity against model size, perplexity against n-gram
order, and what the models carry (the analyse stage's gradient flow and context
use); across corpora: ours against the published references whose configuration
our row ran (pipeline/references.py decides; the others are context, in the tables).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from pipeline.atomic import atomic_path  # noqa: E402
from pipeline.lineup import is_ngram  # noqa: E402


def _count(value: float) -> str:
    """A count as 300k, 2M, 1.5G."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def _size_labels(axis) -> None:
    """Label an axis of counts 300k, 2M, ... (major ticks only)."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
    axis.set_minor_formatter(NullFormatter())


def _plain_log_labels(axis) -> None:
    """Label a log axis 200, 300, ... instead of 2x10^2."""
    label = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(label)
    axis.set_minor_formatter(label)


def _draw_floor(ax, table: pd.DataFrame) -> None:
    """The best achievable perplexity, for a corpus from a known source."""
    floor = table["floor_ppl"].iloc[0] if "floor_ppl" in table else None
    if floor is not None and pd.notna(floor):
        ax.axhline(floor, color="black", linestyle=":", label=f"floor (source entropy) {floor:.2f}")


def save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def load_curves(curves_dir: Path, corpus: str, models: list[str]) -> dict[str, pd.DataFrame]:
    curves = {}
    for model in models:
        path = curves_dir / corpus / f"{model}.json"
        if path.exists():
            curves[model] = pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))
    return curves


def plot_curves(corpus: str, curves: dict[str, pd.DataFrame], table: pd.DataFrame):
    """Validation perplexity against training tokens seen (left) and training minutes
    (right), one line per neural model; the best n-gram as a dashed line."""
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for model, curve in curves.items():
        by_tokens.plot(curve["tokens"], curve["valid_ppl"], marker="o", markersize=3,
                       label=model)
        by_time.plot(curve["elapsed_s"] / 60, curve["valid_ppl"], marker="o", markersize=3,
                     label=model)
    ngrams = table[table["model"].map(is_ngram)]
    if len(ngrams):
        best = ngrams.loc[ngrams["valid_ppl"].idxmin()]
        for ax in (by_tokens, by_time):
            ax.axhline(best["valid_ppl"], color="grey", linestyle="--",
                       label=f"{best['model']} (no training curve)")
    for ax in (by_tokens, by_time):
        _draw_floor(ax, table)
    by_tokens.set(xlabel="training tokens seen", ylabel="validation perplexity", yscale="log",
                  title=f"{corpus}: learning curves", xlim=(0, None))
    by_time.set(xlabel="training time (minutes)", title=f"{corpus}: against wall time",
                xlim=(0, None))
    by_tokens.legend(fontsize="small")
    _size_labels(by_tokens.xaxis)
    by_time.ticklabel_format(axis="x", useOffset=False)
    _plain_log_labels(by_tokens.yaxis)
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3, which="both")
    return fig


def plot_size(corpus: str, table: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker in (("ngram", "s"), ("neural", "o")):
        rows = table[table["model"].map(is_ngram) == (family == "ngram")]
        ax.scatter(rows["size"], rows["test_ppl"], marker=marker, s=40,
                   label="n-grams (size = n-gram entries)" if family == "ngram"
                   else "neural (size = parameters)")
        for row in rows.itertuples():
            ax.annotate(row.model, (row.size, row.test_ppl), textcoords="offset points",
                        xytext=(4, 4), fontsize="small")
    _draw_floor(ax, table)
    ax.set(xscale="log", xlabel="model size", ylabel="test perplexity",
           title=f"{corpus}: test perplexity against size")
    _size_labels(ax.xaxis)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_orders(corpus: str, table: pd.DataFrame):
    rows = table[table["model"].map(is_ngram)].copy()
    rows["order"] = rows["model"].str[2:].astype(int)
    rows = rows.sort_values("order")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rows["order"], rows["valid_ppl"], marker="o", label="valid")
    ax.plot(rows["order"], rows["test_ppl"], marker="s", label="test")
    _draw_floor(ax, table)
    ax.set(xlabel="n-gram order", ylabel="perplexity", xticks=list(rows["order"]),
           title=f"{corpus}: Kneser-Ney perplexity against order")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that ran a published configuration, with its test perplexity."""
    match = table["ref_match"].fillna(False).astype(bool) if "ref_match" in table else False
    return table[match & table["ref_test_ppl"].notna()]


def plot_published(table: pd.DataFrame):
    """Ours (under each reference's selection protocol) against published test perplexity,
    matching rows only (see comparable)."""
    rows = comparable(table)
    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(rows), 1) + 1.5))
    labels = [f"{r.corpus}/{r.model}" for r in rows.itertuples()]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], rows["protocol_test_ppl"], height=0.4,
            label="ours (the reference's protocol)")
    ax.barh([i - 0.2 for i in y], rows["ref_test_ppl"], height=0.4, label="published")
    ax.set_yticks(list(y), labels)
    ax.set(xlabel="test perplexity",
           title="ours against published references (same configuration only)")
    ax.legend()
    ax.grid(alpha=0.3, axis="x")
    return fig


# --- what the models carry: the analyse stage's results (pipeline/analysis.py) ----------


def load_analysis(folder: Path) -> dict[str, dict]:
    """name -> record of reports/analysis/<corpus>/*.json ({} when absent)."""
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(folder.glob("*.json"))}


def plot_gradients(corpus: str, flows: dict[str, dict]):
    """g(k) / g(0) on a log scale, trained (solid) and at initialisation (dotted)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (model, phases) in enumerate(flows.items()):
        for phase, style in (("trained", "-"), ("init", ":")):
            flow = phases[phase]
            g = np.asarray(flow["mean_norm"])
            shown = g > 0  # underflow to 0 has no place on a log axis
            ax.plot(np.asarray(flow["distances"])[shown], g[shown] / g[0], style, color=f"C{i}",
                    label=f"{model} {phase} (x{flow['decay_factor']:.3f} per step)")
    fall = next(iter(flows.values()))["trained"]["fall"]
    ax.axhline(fall, color="grey", linestyle="--", linewidth=0.8)
    ax.set(yscale="log", xlabel="distance k (steps before the predicted position)",
           ylabel="||dL/d state||, relative to k = 0",
           title=f"{corpus}: gradient flow over distance")
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_context(corpus: str, uses: dict[str, dict], table: pd.DataFrame):
    """Perplexity against context length; carried state dotted; n-grams at n - 1."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (model, use) in enumerate(uses.items()):
        ax.plot(use["lengths"], use["ppl"], marker="o", markersize=3, color=f"C{i}",
                label=f"{model} (carried {use['carried_ppl']:.1f})")
        ax.axhline(use["carried_ppl"], color=f"C{i}", linestyle=":", linewidth=0.8)
    ngrams = table[table["model"].map(is_ngram)]
    orders = ngrams["model"].str[2:].astype(int)
    ax.scatter(orders - 1, ngrams["valid_ppl"], marker="s", color="black", zorder=3,
               label="n-grams at n-1 tokens (whole split)")
    for row, order in zip(ngrams.itertuples(), orders, strict=True):
        ax.annotate(row.model, (order - 1, row.valid_ppl), textcoords="offset points",
                    xytext=(4, 4), fontsize="x-small")
    ax.set(xscale="log", yscale="log", xlabel="context k (tokens read after a state reset)",
           ylabel="perplexity of the targets", title=f"{corpus}: context actually used")
    lengths = next(iter(uses.values()))["lengths"]
    ax.set_xticks(lengths, [str(k) for k in lengths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    _plain_log_labels(ax.yaxis)
    ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3, which="both")
    return fig
