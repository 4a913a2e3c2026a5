"""Stage `prepare`: tokenize one corpus into the shared on-disk format.

    python -m pipeline.stages.prepare --corpus ptb --raw data/raw/ptb --out data/prepared/ptb

The work is done in pipeline/encoding.py; this module resolves paths and params.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.corpora import CORPUS_NAMES
from pipeline.encoding import PrepareParams, prepare_corpus
from pipeline.errors import run_stage
from pipeline.params import load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, choices=CORPUS_NAMES)
    parser.add_argument("--raw", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    prepare_corpus(args.corpus, args.raw, args.out, load_section("prepare", PrepareParams))


if __name__ == "__main__":
    run_stage(main)
