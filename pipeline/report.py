"""Stage `report`: plots and a self-contained HTML page over the leaderboard.

    python -m pipeline.report --leaderboard reports/leaderboard.csv \
        --curves reports/curves --samples reports/samples \
        --plots reports/plots --html reports/leaderboard.html

Per corpus: learning curves (validation perplexity against training tokens seen,
the axis that is fair across models, and against training wall time, one line per
neural model), test perplexity against model size, perplexity against n-gram
order; across corpora: ours against the published references whose configuration
our row ran (pipeline/references.py decides; the others are context, in the tables).
The HTML page embeds every plot and sample (base64 PNG, inline CSS) so it opens
offline, and links to the Markdown sample reports. Everything is also logged as
artifacts of an MLflow run `summary/leaderboard`.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.atomic import atomic_path, write_text  # noqa: E402
from pipeline.leaderboard import SCORING_NOTE, floor_note, reference_cells  # noqa: E402
from pipeline.lineup import is_ngram  # noqa: E402
from pipeline.references import REFERENCES_NOTE  # noqa: E402


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


def _save(fig, path: Path) -> Path:
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
    """Ours against published test perplexity, matching rows only (see comparable)."""
    rows = comparable(table)
    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(rows), 1) + 1.5))
    labels = [f"{r.corpus}/{r.model}" for r in rows.itertuples()]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], rows["test_ppl"], height=0.4, label="ours")
    ax.barh([i - 0.2 for i in y], rows["ref_test_ppl"], height=0.4, label="published")
    ax.set_yticks(list(y), labels)
    ax.set(xlabel="test perplexity",
           title="ours against published references (same configuration only)")
    ax.legend()
    ax.grid(alpha=0.3, axis="x")
    return fig


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _num(value, digits: int = 2) -> str:
    if value is None or pd.isna(value):
        return ""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.{digits}f}"
    return f"{int(value):,}"


def render_table(group: pd.DataFrame) -> str:
    best = group["test_ppl"].idxmin()
    char = group["test_bpc"].notna().any()
    head = ["model", "size", "valid ppl", "test ppl", *(["test bpc"] if char else []),
            "tokens (test)", "train time (s)", "epochs", "device", "published test ppl",
            "ours − published", "published model (source)"]
    rows = []
    for index, r in group.iterrows():
        mark = ' class="best" title="best test perplexity"' if index == best else ""
        name = ("★ " if index == best else "") + html.escape(r["model"])
        cells = [name, f"{_num(r['size'])} {html.escape(str(r['size_unit']))}",
                 _num(r["valid_ppl"]), _num(r["test_ppl"]),
                 *([_num(r["test_bpc"], 3)] if char else []), _num(r["test_tokens"]),
                 _num(r["train_seconds"], 1), _num(r.get("epochs")),
                 html.escape(str(r["device"] or "")), _num(r["ref_test_ppl"], 1),
                 html.escape(reference_cells(r)[1]),
                 html.escape(f"{r['ref_description']} ({r['ref_source']})"
                             if isinstance(r["ref_source"], str) and r["ref_source"] else "")]
        rows.append(f"<tr{mark}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def render_samples(record: dict) -> str:
    cards = "".join(
        f'<div class="sample"><h4>{html.escape(model)}</h4><pre>{html.escape(text)}</pre></div>'
        for model, text in record["samples"].items())
    prompt = record["prompt"] or "(none: each model starts after an end of line)"
    return (f'<p class="meta">seed {record["seed"]}, temperature {record["temperature"]}, '
            f'{record["length"]} tokens, prompt {html.escape(repr(prompt))}</p>'
            f'<div class="samples">{cards}</div>')


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, td:last-child { text-align: left; }
tr.best td { background: #e8f5e9; font-weight: bold; }
img { max-width: 100%; margin: 0.5em 0; border: 1px solid #eee; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr));
           gap: 0.8em; }
.sample { border: 1px solid #ddd; border-radius: 4px; padding: 0 0.8em; }
.sample pre { white-space: pre-wrap; font-size: 0.85em; }
.meta, .note { color: #555; }
"""


def render_html(table: pd.DataFrame, plots: dict[str, list[Path]], samples: dict[str, dict],
                published: Path | None) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<title>lm-baselines leaderboard</title>", f"<style>{CSS}</style></head><body>",
             "<h1>lm-baselines leaderboard</h1>",
             f"<p class='note'>{html.escape(SCORING_NOTE)}</p>",
             f"<p class='note'>{html.escape(REFERENCES_NOTE)}</p>",
             "<p>Corpora: " + ", ".join(f"<a href='#{c}'>{html.escape(c)}</a>"
                                         for c in table["corpus"].unique()) + "</p>"]
    for corpus, group in table.groupby("corpus", sort=False):
        floor = floor_note(group) if "floor_ppl" in group else ""
        parts += [f"<h2 id='{html.escape(corpus)}'>{html.escape(corpus)}</h2>",
                  f"<p class='floor'>{html.escape(floor)}</p>" if floor else "",
                  render_table(group), "<p class='note'>★ best test perplexity. "
                  f"<a href='samples/{html.escape(corpus)}.md'>Sample report (Markdown)</a>"
                  "</p>"]
        parts += [_img(p, p.stem) for p in plots.get(corpus, [])]
        if corpus in samples:
            parts += [f"<h3>Samples: {html.escape(corpus)}</h3>", render_samples(samples[corpus])]
    if published is not None:
        parts += ["<h2>Ours against published references</h2>", _img(published, "published")]
    parts.append("</body></html>")
    return "\n".join(parts)


def make_report(leaderboard: Path, curves_dir: Path, samples_dir: Path, plots_dir: Path,
                out_html: Path) -> dict[str, list[Path]]:
    table = pd.read_csv(leaderboard)
    plots: dict[str, list[Path]] = {}
    samples: dict[str, dict] = {}
    with atomic_path(plots_dir, directory=True) as staging:
        for corpus, group in table.groupby("corpus", sort=False):
            neural = [m for m in group["model"] if not is_ngram(m)]
            curves = load_curves(curves_dir, corpus, neural)
            made = []
            if curves:
                made.append(_save(plot_curves(corpus, curves, group),
                                  staging / f"{corpus}-curves.png"))
            made.append(_save(plot_size(corpus, group), staging / f"{corpus}-size.png"))
            if group["model"].map(is_ngram).sum() > 1:
                made.append(_save(plot_orders(corpus, group), staging / f"{corpus}-orders.png"))
            plots[corpus] = made
            sample_file = samples_dir / f"{corpus}.json"
            if sample_file.exists():
                samples[corpus] = json.loads(sample_file.read_text(encoding="utf-8"))
        published = (_save(plot_published(table), staging / "published.png")
                     if len(comparable(table)) else None)
        write_text(out_html, render_html(table, plots, samples, published))
    # the plots now live in plots_dir
    return {c: [plots_dir / p.name for p in ps] for c, ps in plots.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaderboard", required=True, type=Path)
    parser.add_argument("--curves", required=True, type=Path)
    parser.add_argument("--samples", required=True, type=Path)
    parser.add_argument("--plots", required=True, type=Path)
    parser.add_argument("--html", required=True, type=Path)
    args = parser.parse_args(argv)
    plots = make_report(args.leaderboard, args.curves, args.samples, args.plots, args.html)
    print(f"wrote {args.html} and {sum(len(p) for p in plots.values()) + 1} plots in {args.plots}")
    with tracking.model_run("summary", "leaderboard", "report", "report", {}) as run:
        run.log_artifact(args.html)
        run.log_artifact(args.leaderboard)
        for path in sorted(args.plots.glob("*.png")):
            run.log_artifact(path, "plots")
        for path in sorted(args.samples.glob("*.md")):
            run.log_artifact(path, "samples")


if __name__ == "__main__":
    main()
