"""Stage `ngram`: a modified Kneser-Ney n-gram of one order on one corpus, via KenLM.

    python -m pipeline.stages.ngram --corpus ptb --order 5 --data data/prepared/ptb \
        --model models/ptb/kn5.bin --metrics reports/metrics/ptb/kn5.json

The work is done in pipeline/kneser_ney.py; this module resolves paths and params.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import tracking
from pipeline.atomic import write_json
from pipeline.corpora import CORPUS_NAMES
from pipeline.errors import run_stage
from pipeline.kneser_ney import NgramError, NgramParams, build_ngram
from pipeline.params import load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, choices=CORPUS_NAMES)
    parser.add_argument("--order", required=True, type=int)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)
    params = load_section("ngram", NgramParams)
    if not 2 <= args.order <= 6:
        raise NgramError(f"--order must be 2..6 (what kenlm.Model loads), got {args.order}")
    metrics = build_ngram(corpus=args.corpus, order=args.order, data_dir=args.data,
                          model_path=args.model, params=params)
    # The metrics file is written before MLflow is touched: a broken store never
    # costs the result.
    write_json(args.metrics, metrics)
    print(f"{args.corpus} {metrics['model']}: valid ppl {metrics['valid_ppl']:.2f}, "
          f"test ppl {metrics['test_ppl']:.2f} ({metrics['test_tokens']} test tokens)")
    run_params = {"order": args.order, "memory": params.memory,
                  "discount_fallback": metrics["discount_fallback"],
                  "prune": " ".join(map(str, metrics["prune"])) or "none",
                  "binary": params.binary}
    with tracking.model_run(args.corpus, metrics["model"], "ngram",
                            f"ngram@{args.corpus}-{args.order}", run_params) as run:
        run.log_metrics({k: v for k, v in metrics.items() if k.endswith(
            ("_ppl", "_tokens", "_bpc", "_nll_nats", "seconds")) or k == "size"})
        run.log_artifact(args.metrics)


if __name__ == "__main__":
    run_stage(main)
