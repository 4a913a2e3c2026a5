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
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.atomic import atomic_path, write_text  # noqa: E402
from pipeline.errors import run_stage  # noqa: E402
from pipeline.leaderboard import SCORING_NOTE, floor_note, reference_cells  # noqa: E402
from pipeline.lineup import is_ngram  # noqa: E402
from pipeline.references import REFERENCES_NOTE, protocols_note  # noqa: E402


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


# --- what the models carry: the analyse stage's results (pipeline/analyse.py) -----------


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


def _reach(flow: dict) -> str:
    return f"after {flow['reach']} steps" if flow["reach"] is not None else "never, within K"


def gradients_sentence(record: dict) -> str:
    flows = record["models"]
    trained = "; ".join(
        f"{m} x{p['trained']['decay_factor']:.3f} per step (below 1e-3: {_reach(p['trained'])}; "
        f"initialised x{p['init']['decay_factor']:.3f})" for m, p in flows.items())
    windows = next(iter(flows.values()))["trained"]["windows"]
    return (f"The norm of the gradient of one prediction's loss with respect to the state k "
            f"steps earlier, relative to k = 0, averaged over {windows} windows of the "
            f"{record['split']} split (dotted: the same network at initialisation). "
            f"Per-step decay factor (log-linear fit) of the trained models: {trained}.")


def context_sentence(record: dict) -> str:
    uses = record["models"]
    lengths = next(iter(uses.values()))["lengths"]
    said = "; ".join(f"{m} from k = {u['enough']}" if u["enough"] is not None
                     else f"{m} still over 1% away at k = {lengths[-1]}"
                     for m, u in uses.items())
    targets = next(iter(uses.values()))["targets"]
    return (f"Perplexity of the same {targets} {record['split']} targets when the state is "
            "reset k tokens before each (dotted: the state carried from the split's start; "
            "squares: each n-gram at its n-1 tokens, over the whole split). Within 1% of the "
            f"carried-state perplexity: {said}.")


def grad_norm_table(curves: dict[str, pd.DataFrame]) -> str:
    """The training loop's pre-clipping gradient norms, per model, where curves have them."""
    keys = ("grad_norm_median", "grad_norm_max", "clipped_fraction")
    rows = [(m, c) for m, c in curves.items() if all(k in c for k in keys)]
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{c['grad_norm_median'].median():.3g}</td>"
        f"<td>{c['grad_norm_max'].max():.3g}</td><td>{c['clipped_fraction'].mean():.1%}</td>"
        f"<td>{c['clipped_fraction'].iloc[0]:.1%} → {c['clipped_fraction'].iloc[-1]:.1%}</td></tr>"
        for m, c in rows)
    most = max(rows, key=lambda mc: mc[1]["clipped_fraction"].mean())
    return ("<h4>Gradient norms during training (before clipping)</h4>"
            f"<p>Per model over its run: the median of the per-segment medians, the largest "
            f"norm seen, and the share of steps the clip cut. {html.escape(most[0])} was "
            f"clipped most: {most[1]['clipped_fraction'].mean():.1%} of its steps.</p>"
            "<table><thead><tr><th>model</th><th>median norm</th><th>max norm</th>"
            "<th>steps clipped</th><th>first → last segment</th></tr></thead><tbody>"
            + body + "</tbody></table>")


def dependencies_table(record: dict) -> str:
    """Excess loss over the exact floor at the dependent positions, per model and gap."""
    models = record["models"]
    gaps = next(iter(models.values()))["gaps"]
    head = "".join(f"<th>gap {g}</th>" for g in gaps) + "<th>largest gap carried</th>"
    body = "".join(f"<tr><td>{html.escape(m)}</td>"
                   + "".join(f"<td>{e:.3f}</td>" for e in r["excess_nats"])
                   + f"<td>{r.get('carried_gap') or 'none'}</td></tr>"
                   for m, r in models.items())
    return (f"<h4>Long-range dependencies: loss above the floor (nats)</h4><p>At each "
            f"dependent position the best possible loss is {record['floor_nats']:.3f} nats "
            f"(the source's own uncertainty); a model that forgot the token d positions back "
            f"pays {record['forget_nats']:.3f} nats above it. Mean over the "
            f"{record['split']} split's dependent positions of each gap. A gap is carried "
            f"where the excess is below {record['carried_below_nats']} nats.</p>"
            f"<table><thead><tr><th>model</th>{head}</tr></thead><tbody>{body}</tbody></table>")


def analysis_section(corpus: str, records: dict[str, dict], curves: dict[str, pd.DataFrame],
                     table: pd.DataFrame, staging: Path) -> tuple[str, list[Path]]:
    """The HTML of a corpus's analysis section and the plots it embeds."""
    parts: list[str] = []
    made: list[Path] = []
    if records.get("gradients", {}).get("models"):
        made.append(_save(plot_gradients(corpus, records["gradients"]["models"]),
                          staging / f"{corpus}-gradients.png"))
        parts += [_img(made[-1], "gradient flow"),
                  f"<p>{html.escape(gradients_sentence(records['gradients']))}</p>"]
    if records.get("context", {}).get("models"):
        made.append(_save(plot_context(corpus, records["context"]["models"], table),
                          staging / f"{corpus}-context.png"))
        parts += [_img(made[-1], "context use"),
                  f"<p>{html.escape(context_sentence(records['context']))}</p>"]
    parts.append(grad_norm_table(curves))
    if records.get("dependencies"):
        parts.append(dependencies_table(records["dependencies"]))
    parts = [p for p in parts if p]
    if not parts:
        return "", made
    return "\n".join([f"<h3>What the models carry: {html.escape(corpus)}</h3>", *parts]), made


def summary_table(analyses: dict[str, dict[str, dict]]) -> str:
    """Across corpora: per recurrent model, the decay factors and the context it uses."""
    rows = []
    for corpus, records in analyses.items():
        flows = records.get("gradients", {}).get("models", {})
        uses = records.get("context", {}).get("models", {})
        for model, use in uses.items():
            flow = flows.get(model)
            cells = [corpus, model,
                     f"{flow['init']['decay_factor']:.3f}" if flow else "",
                     f"{flow['trained']['decay_factor']:.3f}" if flow else "",
                     str(use["enough"]) if use["enough"] is not None
                     else f"> {use['lengths'][-1]}"]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    if not rows:
        return ""
    return ("<h2>What the models carry, in one table</h2><p>Per-step gradient decay factor "
            "(log-linear fit of the gradient norm over distance) at initialisation and "
            "trained, and the context length from which perplexity is within 1% of the "
            "carried state's.</p><table><thead><tr><th>corpus</th><th>model</th>"
            "<th>decay, init</th><th>decay, trained</th><th>context used (tokens)</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


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
                published: Path | None, analysis: dict[str, str] | None = None,
                summary: str = "") -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<title>lm-baselines leaderboard</title>", f"<style>{CSS}</style></head><body>",
             "<h1>lm-baselines leaderboard</h1>",
             f"<p class='note'>{html.escape(SCORING_NOTE)}</p>",
             f"<p class='note'>{html.escape(REFERENCES_NOTE)}</p>",
             f"<p class='note'>{html.escape(protocols_note())}</p>",
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
        parts.append((analysis or {}).get(corpus, ""))
    if published is not None:
        parts += ["<h2>Ours against published references</h2>", _img(published, "published")]
    parts += [summary, "</body></html>"]
    return "\n".join(parts)


def make_report(leaderboard: Path, curves_dir: Path, samples_dir: Path, plots_dir: Path,
                out_html: Path, analysis_dir: Path | None = None) -> dict[str, list[Path]]:
    table = pd.read_csv(leaderboard)
    plots: dict[str, list[Path]] = {}
    samples: dict[str, dict] = {}
    analysis: dict[str, str] = {}  # corpus -> its analysis section
    analyses: dict[str, dict[str, dict]] = {}  # corpus -> its analysis records
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
            if analysis_dir is not None:
                analyses[corpus] = load_analysis(analysis_dir / corpus)
                # its plots go to the plots folder too, shown in the analysis section
                analysis[corpus], _ = analysis_section(corpus, analyses[corpus], curves,
                                                       group, staging)
            sample_file = samples_dir / f"{corpus}.json"
            if sample_file.exists():
                samples[corpus] = json.loads(sample_file.read_text(encoding="utf-8"))
        published = (_save(plot_published(table), staging / "published.png")
                     if len(comparable(table)) else None)
        write_text(out_html, render_html(table, plots, samples, published, analysis,
                                         summary_table(analyses)))
    # the plots now live in plots_dir
    return {c: [plots_dir / p.name for p in ps] for c, ps in plots.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaderboard", required=True, type=Path)
    parser.add_argument("--curves", required=True, type=Path)
    parser.add_argument("--samples", required=True, type=Path)
    parser.add_argument("--plots", required=True, type=Path)
    parser.add_argument("--html", required=True, type=Path)
    parser.add_argument("--analysis", type=Path, help="reports/analysis (the analyse stage)")
    args = parser.parse_args(argv)
    plots = make_report(args.leaderboard, args.curves, args.samples, args.plots, args.html,
                        args.analysis)
    print(f"wrote {args.html} and {sum(len(p) for p in plots.values()) + 1} plots in {args.plots}")
    with tracking.model_run(tracking.SUMMARY_EXPERIMENT, "leaderboard", "report", "report",
                            {}) as run:
        run.log_artifact(args.html)
        run.log_artifact(args.leaderboard)
        for path in sorted(args.plots.glob("*.png")):
            run.log_artifact(path, "plots")
        for path in sorted(args.samples.glob("*.md")):
            run.log_artifact(path, "samples")


if __name__ == "__main__":
    run_stage(main)
