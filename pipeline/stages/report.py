"""Stage `report`: plots and a self-contained HTML page over the leaderboard.

    python -m pipeline.stages.report --leaderboard reports/leaderboard.csv \
        --curves reports/curves --samples reports/samples \
        --plots reports/plots --html reports/leaderboard.html

The plots are pipeline/plots.py's, the page pipeline/page.py's. Everything is also
logged as artifacts of an MLflow run `summary/leaderboard`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import tracking
from pipeline.errors import run_stage
from pipeline.page import make_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaderboard", required=True, type=Path)
    parser.add_argument("--curves", required=True, type=Path)
    parser.add_argument("--samples", required=True, type=Path)
    parser.add_argument("--plots", required=True, type=Path)
    parser.add_argument("--html", required=True, type=Path)
    parser.add_argument("--analysis", type=Path, help="reports/analysis (the analyse stage)")
    args = parser.parse_args(argv)
    plots = make_report(leaderboard=args.leaderboard, curves_dir=args.curves,
                        samples_dir=args.samples, plots_dir=args.plots, out_html=args.html,
                        analysis_dir=args.analysis)
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
