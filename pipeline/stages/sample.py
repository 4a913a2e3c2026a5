"""Stage `sample`: text from every model of one corpus, side by side.

    python -m pipeline.stages.sample --corpus ptb --data data/prepared/ptb --models models/ptb \
        --out reports/samples/ptb.md

The work is done in pipeline/sampling.py; this module resolves paths and params.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from pipeline import tracking
from pipeline.atomic import write_json, write_text
from pipeline.corpora import CORPUS_NAMES
from pipeline.errors import run_stage
from pipeline.lineup import models_of
from pipeline.params import load_section
from pipeline.sampling import SampleParams, render_markdown, sample_corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, choices=CORPUS_NAMES)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--models", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="the Markdown report")
    parser.add_argument("--out-json", required=True, type=Path, help="the same, as data")
    args = parser.parse_args(argv)
    params = load_section("sample", SampleParams)
    models = models_of(args.corpus)
    record = sample_corpus(corpus=args.corpus, data_dir=args.data, models_dir=args.models,
                           models=models, params=params)
    write_json(args.out_json, record)
    write_text(args.out, render_markdown(record))
    print(f"{args.corpus}: samples from {len(models)} models in {args.out}")
    with tracking.model_run(args.corpus, "samples", "report", f"sample@{args.corpus}",
                            asdict(params)) as run:
        run.log_artifact(args.out)
        run.log_artifact(args.out_json)


if __name__ == "__main__":
    run_stage(main)
