"""Stage `download`: fetch one corpus into data/raw/<corpus>/, verified.

    python -m pipeline.stages.download --corpus ptb --out data/raw/ptb

The work is done in pipeline/fetch.py; this module resolves paths and params.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.corpora import CORPUS_NAMES
from pipeline.errors import run_stage
from pipeline.fetch import DownloadParams, download_corpus
from pipeline.params import load_section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, choices=CORPUS_NAMES)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    download_corpus(args.corpus, args.out, load_section("download", DownloadParams))


if __name__ == "__main__":
    run_stage(main)
