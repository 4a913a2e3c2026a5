"""Stage `analyse`: what the trained recurrent models learned to carry, measured.

    python -m pipeline.stages.analyse --corpus ptb --data data/prepared/ptb --models models/ptb \
        --out reports/analysis/ptb

The work is done in pipeline/analysis.py; this module resolves paths and params.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from pipeline import tracking
from pipeline.analysis import AnalyseParams, analyse_corpus, metrics_of
from pipeline.atomic import atomic_path, write_json
from pipeline.corpora import CORPUS_NAMES
from pipeline.errors import run_stage
from pipeline.hostmemory import reuse_freed_memory
from pipeline.lineup import models_of
from pipeline.params import load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, choices=CORPUS_NAMES)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--models", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="folder for the JSON files")
    args = parser.parse_args(argv)
    params = load_section("analyse", AnalyseParams)
    reuse_freed_memory()  # the same numbers, fewer page faults (pipeline/hostmemory.py)
    results = analyse_corpus(corpus=args.corpus, data=args.data, models_dir=args.models,
                             models=models_of(args.corpus), params=params)
    names = [name for name in ("gradients", "context", "dependencies") if name in results]
    with atomic_path(args.out, directory=True) as staging:  # all files or none
        for name in names:
            # gradients, context: {"models": {model: ...}}; dependencies: already a record
            body = results[name] if name == "dependencies" else {"models": results[name]}
            write_json(staging / f"{name}.json", {"corpus": args.corpus,
                                                  "split": params.split, **body})
    files = [args.out / f"{name}.json" for name in names]
    print(f"{args.corpus}: wrote {', '.join(str(p) for p in files)}")
    with tracking.model_run(args.corpus, "analysis", "report", f"analyse@{args.corpus}",
                            asdict(params)) as run:
        run.log_metrics(metrics_of(results))
        for path in files:
            run.log_artifact(path)


if __name__ == "__main__":
    run_stage(main)
