"""The report's self-contained HTML page over the leaderboard (the `report` stage's work,
pipeline/stages/report.py).

The page embeds every plot (pipeline/plots.py) and sample (base64 PNG, inline CSS) so it
opens offline, and links to the Markdown sample reports; per corpus it adds what the
models carry (the analyse stage's results) in sentences and tables.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_path, write_text
from pipeline.leaderboard_table import SCORING_NOTE, floor_note, reference_cells
from pipeline.lineup import is_ngram
from pipeline.plots import (
    comparable,
    load_analysis,
    load_curves,
    plot_context,
    plot_curves,
    plot_gradients,
    plot_orders,
    plot_published,
    plot_size,
    save,
)
from pipeline.references import REFERENCES_NOTE, protocols_note


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
        made.append(save(plot_gradients(corpus, records["gradients"]["models"]),
                          staging / f"{corpus}-gradients.png"))
        parts += [_img(made[-1], "gradient flow"),
                  f"<p>{html.escape(gradients_sentence(records['gradients']))}</p>"]
    if records.get("context", {}).get("models"):
        made.append(save(plot_context(corpus, records["context"]["models"], table),
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
                made.append(save(plot_curves(corpus, curves, group),
                                  staging / f"{corpus}-curves.png"))
            made.append(save(plot_size(corpus, group), staging / f"{corpus}-size.png"))
            if group["model"].map(is_ngram).sum() > 1:
                made.append(save(plot_orders(corpus, group), staging / f"{corpus}-orders.png"))
            plots[corpus] = made
            if analysis_dir is not None:
                analyses[corpus] = load_analysis(analysis_dir / corpus)
                # its plots go to the plots folder too, shown in the analysis section
                analysis[corpus], _ = analysis_section(corpus, analyses[corpus], curves,
                                                       group, staging)
            sample_file = samples_dir / f"{corpus}.json"
            if sample_file.exists():
                samples[corpus] = json.loads(sample_file.read_text(encoding="utf-8"))
        published = (save(plot_published(table), staging / "published.png")
                     if len(comparable(table)) else None)
        write_text(out_html, render_html(table, plots, samples, published, analysis,
                                         summary_table(analyses)))
    # the plots now live in plots_dir
    return {c: [plots_dir / p.name for p in ps] for c, ps in plots.items()}
