"""Stage `train`: one neural language model on one corpus, then its exact scores.

    python -m pipeline.stages.train --corpus ptb --model lstm2 --data data/prepared/ptb \
        --checkpoints models/ptb/lstm2.ckpt --out models/ptb/lstm2.pt \
        --metrics reports/metrics/ptb/lstm2.json --curve reports/curves/ptb/lstm2.json

The configuration is the preset `train.preset` resolved for this corpus and model
(pipeline/presets.py; print it with `python -m pipeline.presets show ptb lstm2`);
switch the whole pipeline with `dvc exp run -S train.preset=medium`.
Checkpoints go to --checkpoints (kept across DVC runs, so a killed run resumes),
the best one (by validation perplexity) is published as --out, and the metrics
(pipeline/neural.py does the work) go to --metrics and the MLflow run.

Data-parallel: `train.nproc: N` makes this stage relaunch itself as N ranks on
this machine (torchrun --standalone); several machines run torchrun themselves
with the same arguments (notes in pipeline/distributed.py). Rank 0 alone writes
the outputs and the MLflow run; the other ranks train and exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from pipeline import distributed, tracking
from pipeline.atomic import write_json
from pipeline.corpora import CORPUS_NAMES
from pipeline.errors import run_stage
from pipeline.hostmemory import reuse_freed_memory
from pipeline.networks import KINDS
from pipeline.neural import check_ranks, pick_device, precision_of, train_and_score
from pipeline.params import load_section
from pipeline.presets import TrainParams
from pipeline.training import TrainingInterrupted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, choices=CORPUS_NAMES)
    parser.add_argument("--model", required=True, choices=KINDS)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--checkpoints", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--curve", required=True, type=Path)
    parser.add_argument("--preset", help="another preset than train.preset (reproductions "
                        "outside the pipeline's matrix; see the Makefile)")
    args = parser.parse_args(argv)
    params = load_section("train", TrainParams)
    if args.preset:
        params = dataclasses.replace(params, preset=args.preset)
        params.validate("train")
    if params.nproc > 1 and not distributed.launched():
        check_ranks(params, args.corpus, args.model, params.nproc)  # one line, not N
        precision_of(pick_device(params.device), params, args.model)  # likewise
        command = distributed.torchrun_command(
            params.nproc, "pipeline.stages.train", sys.argv[1:] if argv is None else argv)
        print(f"train.nproc {params.nproc}: {' '.join(command)}", flush=True)
        os.execv(command[0], command)  # the stage becomes torchrun (DVC waits on it)
    reuse_freed_memory()  # faster on CPU, the same numbers (pipeline/hostmemory.py)
    try:
        with distributed.initialised(pick_device(params.device)) as world:
            if world.is_main:
                _train_and_publish(args, params, world)
            else:  # the other ranks only train: no outputs, no MLflow run
                train_and_score(**_paths(args), params=params, world=world)
    except TrainingInterrupted as exc:
        if int(os.environ.get("RANK", 0)) == 0:  # one message, not one per rank
            print(f"{args.corpus} {args.model}: interrupted ({exc}); rerun the same command "
                  "(`dvc repro`, or the make target that started it) to resume from there",
                  file=sys.stderr)
        sys.exit(exc.exit_code)


def _train_and_publish(args: argparse.Namespace, params: TrainParams,
                       world: distributed.World) -> None:
    """Rank 0 (or the one process): train in an MLflow run, write the metrics."""
    spec = params.spec(args.corpus, args.model)
    with tracking.model_run(args.corpus, args.model, "neural",
                            f"train@{args.corpus}-{args.model}", spec.flat(),
                            preset=params.preset) as run:
        metrics = train_and_score(**_paths(args), params=params, run=run, world=world)
        # written before the final MLflow calls: a broken store never costs the result
        write_json(args.metrics, metrics)
        run.log_metrics({k: v for k, v in metrics.items() if k.startswith(("valid_", "test_"))
                         or k in ("size", "train_seconds", "tokens_per_s", "train_tokens")})
        run.log_artifact(args.metrics)
    print(f"{args.corpus} {args.model}: valid ppl {metrics['valid_ppl']:.2f}, "
          f"test ppl {metrics['test_ppl']:.2f} ({metrics['epochs']:g} epochs, "
          f"{metrics['train_tokens']:,} tokens, {metrics['train_seconds']:.0f} s on "
          f"{metrics['device']})")



def _paths(args: argparse.Namespace) -> dict:
    """train_and_score's corpus, model and paths, from the command line."""
    return {"corpus": args.corpus, "model": args.model, "data_dir": args.data,
            "checkpoints": args.checkpoints, "out": args.out, "curve": args.curve}


if __name__ == "__main__":
    run_stage(main)
