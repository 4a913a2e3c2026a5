"""Stage `leaderboard`: every model's metrics file -> one table per corpus.

    python -m pipeline.stages.leaderboard --metrics-dir reports/metrics --prepared data/prepared \
        --out-md reports/leaderboard.md --out-csv reports/leaderboard.csv \
        --out-json reports/leaderboard.json --committed reports/reproductions

The work is done in pipeline/leaderboard_table.py; this module resolves paths and params.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import run_stage
from pipeline.leaderboard_table import make_leaderboard, make_reproductions
from pipeline.lineup import configured_models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics-dir", type=Path)
    parser.add_argument("--prepared", type=Path)
    parser.add_argument("--out-md", required=True, type=Path)
    parser.add_argument("--out-csv", type=Path)
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--committed", type=Path, help="also show the committed runs of this "
                        "folder (<folder>/<run>/metrics.json) on --out-md")
    parser.add_argument("--reproductions", type=Path, help="instead: the committed "
                        "reproductions (<folder>/<run>/metrics.json) to --out-md")
    args = parser.parse_args(argv)
    if args.reproductions:
        table = make_reproductions(args.reproductions, args.out_md)
        print(table[["run", "model", "test_ppl", "protocol_test_ppl", "test_ppl_minus_ref"]]
              .to_string(index=False))
        return
    missing = [f"--{k.replace('_', '-')}" for k in ("metrics_dir", "prepared", "out_csv",
                                                     "out_json") if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    table = make_leaderboard(metrics_dir=args.metrics_dir, prepared_dir=args.prepared,
                             models=configured_models(), out_md=args.out_md,
                             out_csv=args.out_csv, out_json=args.out_json,
                             committed=args.committed)
    print(table[["corpus", "model", "valid_ppl", "test_ppl", "test_tokens"]]
          .to_string(index=False))


if __name__ == "__main__":
    run_stage(main)
