"""Stage `train`: one neural language model on one corpus, then its exact scores.

    python -m pipeline.train --corpus ptb --model lstm2 --data data/prepared/ptb \
        --checkpoints models/ptb/lstm2.ckpt --out models/ptb/lstm2.pt \
        --metrics reports/metrics/ptb/lstm2.json --curve reports/curves/ptb/lstm2.json

The configuration is `train.presets.<train.preset>.<model>`, with per-corpus
`overrides`; switch the whole pipeline with `dvc exp run -S train.preset=paper`.
Checkpoints go to --checkpoints (kept across DVC runs, so a killed run resumes),
the best one (by validation perplexity) is published as --out, and valid/test
perplexity of that best model come from the one stream scorer.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pipeline import tracking
from pipeline.atomic import atomic_path, write_json
from pipeline.corpora import CORPUS_NAMES
from pipeline.dataset import PreparedCorpus
from pipeline.networks import KINDS, NetworkConfig
from pipeline.params import ParamsError, build, load_section, require
from pipeline.perplexity import score_stream
from pipeline.training import TrainConfig, TrainingInterrupted, load_model, train_model

DESCRIPTIONS = {
    "window": "fixed-window neural LM (Bengio et al. 2003)",
    "rnn": "Elman RNN (tanh), 1 layer",
    "lstm": "LSTM, 1 layer",
    "lstm2": "LSTM, 2 layers",
}


@dataclass(frozen=True)
class ModelSpec:
    """One model's network and training settings in a preset."""

    embedding_size: int
    hidden_size: int
    context: int
    dropout: float
    tie_weights: bool
    direct_connections: bool
    init_range: float
    batch_size: int
    bptt: int
    epochs: int
    optimizer: Literal["sgd", "adam"]
    lr: float
    schedule: Literal["decay", "plateau"]
    lr_decay: float
    decay_after: int
    clip: float
    time_budget_s: float
    seed: int

    def validate(self, key: str) -> None:
        # the network's own checks (sizes, dropout, tying, ...) run in TrainParams.spec
        for name in ("batch_size", "bptt", "epochs"):
            require(getattr(self, name) > 0, f"{key}.{name}",
                    f"must be positive, got {getattr(self, name)}")
        require(self.lr > 0, f"{key}.lr", f"must be positive, got {self.lr}")
        require(self.lr_decay >= 1, f"{key}.lr_decay", f"must be >= 1, got {self.lr_decay}")
        require(self.clip >= 0, f"{key}.clip", f"must be >= 0, got {self.clip}")
        require(self.time_budget_s >= 0, f"{key}.time_budget_s",
                f"must be >= 0, got {self.time_budget_s}")

    def network(self, kind: str, vocab_size: int) -> NetworkConfig:
        return NetworkConfig(kind=kind, vocab_size=vocab_size,
                             embedding_size=self.embedding_size, hidden_size=self.hidden_size,
                             context=self.context, dropout=self.dropout,
                             tie_weights=self.tie_weights,
                             direct_connections=self.direct_connections,
                             init_range=self.init_range)

    def training(self) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, bptt=self.bptt, epochs=self.epochs,
                           optimizer=self.optimizer, lr=self.lr, schedule=self.schedule,
                           lr_decay=self.lr_decay, decay_after=self.decay_after,
                           clip=self.clip, time_budget_s=self.time_budget_s, seed=self.seed)


@dataclass(frozen=True)
class TrainParams:
    preset: str
    models: tuple[str, ...]  # the neural models every corpus gets (dvc.yaml expands them)
    device: Literal["auto", "cpu", "cuda", "mps"]
    bf16: bool  # bfloat16 autocast for training on CUDA
    eval_chunk: int  # tokens per forward pass when scoring (does not change the result)
    checkpoint_every_s: float  # seconds between mid-epoch resume points; 0 = epoch ends only
    presets: dict

    def validate(self, key: str) -> None:
        for model in self.models:
            require(model in KINDS, f"{key}.models",
                    f"unknown model {model!r}; known: {', '.join(KINDS)}")
        require(self.preset in self.presets, f"{key}.preset",
                f"unknown preset {self.preset!r}; defined: {', '.join(self.presets)}")
        require(self.eval_chunk > 0, f"{key}.eval_chunk",
                f"must be positive, got {self.eval_chunk}")
        require(self.checkpoint_every_s >= 0, f"{key}.checkpoint_every_s",
                f"must be >= 0, got {self.checkpoint_every_s}")
        preset = self.presets[self.preset]
        for name in preset:
            require(name in (*KINDS, "overrides"), f"{key}.presets.{self.preset}",
                    f"unknown model {name!r}; known: {', '.join(KINDS)} (and overrides)")
        overrides = preset.get("overrides") or {}
        for corpus, models in overrides.items():
            require(corpus in CORPUS_NAMES, f"{key}.presets.{self.preset}.overrides",
                    f"unknown corpus {corpus!r}; known: {', '.join(CORPUS_NAMES)}")
            for model in models or {}:
                require(model in KINDS, f"{key}.presets.{self.preset}.overrides.{corpus}",
                        f"unknown model {model!r}; known: {', '.join(KINDS)}")
        for model in self.models:
            for corpus in ("", *overrides):
                self.spec(corpus, model)  # every combination must resolve

    def spec(self, corpus: str, model: str) -> ModelSpec:
        """The preset's settings for `model`, with the corpus's overrides applied."""
        preset = self.presets[self.preset]
        key = f"train.presets.{self.preset}"
        if model not in preset:
            raise ParamsError(f"{key} has no settings for model {model!r}")
        overrides = ((preset.get("overrides") or {}).get(corpus) or {}).get(model) or {}
        unknown = set(overrides) - {f for f in ModelSpec.__dataclass_fields__}
        if unknown:
            raise ParamsError(f"unknown key {key}.overrides.{corpus}.{model}.{sorted(unknown)[0]}")
        spec = build(ModelSpec, {**preset[model], **overrides}, f"{key}.{model}")
        problems = spec.network(model, 1).check()
        if problems:
            name, problem = problems[0]
            raise ParamsError(f"{key}.{model}.{name}: {problem}")
        return spec


class OutOfMemory(RuntimeError):
    pass


def pick_device(requested: str) -> str:
    import torch

    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if requested != "auto":
        if not available[requested]:
            raise ParamsError(f"train.device: {requested} requested but this machine has "
                              "no such device (use auto or cpu)")
        return requested
    return next(name for name in ("cuda", "mps", "cpu") if available[name])


def train_and_score(corpus: str, model: str, data_dir: Path, checkpoints: Path, out: Path,
                    curve: Path, params: TrainParams, run=None) -> dict:
    """Train (or resume) `model` on `corpus`, publish its best checkpoint, return metrics."""
    import torch

    data = PreparedCorpus(data_dir)
    vocab = data.vocabulary()
    if vocab.eos_id != 0:  # the window model's start context is id 0 (see networks.py)
        raise RuntimeError(f"{data_dir}: <eos> must be token id 0 (rerun prepare)")
    spec = params.spec(corpus, model)
    device = pick_device(params.device)
    logged: set[int] = set()
    curve_so_far: list[dict] = []

    def log_epoch(record: dict) -> None:
        # "epoch_" names keep the curve apart from the final (best-checkpoint) scores
        if run is not None and record["epoch"] not in logged:
            run.log_metrics({f"epoch_{k}": v for k, v in record.items() if k != "epoch"},
                            step=record["epoch"])
            logged.add(record["epoch"])

    def on_epoch(record: dict) -> None:
        log_epoch(record)
        curve_so_far.append(record)
        write_json(curve, curve_so_far)  # DVC plots: the learning curve so far

    extra = {"vocab_digest": vocab.digest(), "corpus": corpus, "preset": params.preset,
             "resolved_params": asdict(spec)}
    print(f"{corpus} {model}: training on {device} ({params.preset} preset, "
          f"{spec.epochs} epochs)", flush=True)  # flushed: DVC logs show where it is
    try:
        result = train_model(spec.network(model, len(vocab)), spec.training(),
                             data.ids("train"), data.ids("valid"), vocab.eos_id, checkpoints,
                             device, on_epoch, params.bf16, extra, params.eval_chunk,
                             params.checkpoint_every_s)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError saying so
        if not isinstance(exc, torch.OutOfMemoryError) and \
                "can't allocate memory" not in str(exc):
            raise
        raise OutOfMemory(
            f"{device} ran out of memory training {corpus}/{model} with batch_size "
            f"{spec.batch_size}: lower train.presets.{params.preset}.{model}.batch_size "
            f"(or bptt / hidden_size). {str(exc).splitlines()[0]}"
        ) from None
    history = result["history"]
    for record in history:  # epochs from before a resume went to an earlier run
        log_epoch(record)
    write_json(curve, history)
    with atomic_path(out) as tmp:
        shutil.copyfile(checkpoints / "best.pt", tmp)
    best_epoch = min(history, key=lambda r: r["valid_ppl"])["epoch"]
    metrics: dict = {
        "corpus": corpus,
        "model": model,
        "family": "neural",
        "description": DESCRIPTIONS[model],
        "level": vocab.level,
        "size": result["parameters"],
        "size_unit": "parameters",
        "train_seconds": round(result["seconds"], 1),
        "tokens_per_s": round(sum(r["tokens"] for r in history) / result["seconds"], 1),
        "device": device,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "preset": params.preset,
        "scoring": "one stream per split, state carried across chunks",
        "vocab_size": len(vocab),
        "vocab_digest": vocab.digest(),
    }
    best = load_model(out, device, vocab.digest())
    for split in ("valid", "test"):
        score = score_stream(best, data.ids(split), params.eval_chunk, vocab.eos_id, device)
        expected = data.meta["tokens_per_split"][split]
        if score.tokens != expected:
            raise RuntimeError(f"scored {score.tokens} tokens of {split}, prepare counted "
                               f"{expected}")
        metrics.update(score.metrics(split, vocab.level))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--model", required=True, choices=KINDS)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--checkpoints", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--curve", required=True, type=Path)
    args = parser.parse_args(argv)
    params = load_section("train", TrainParams)
    spec = params.spec(args.corpus, args.model)
    with tracking.model_run(args.corpus, args.model, "neural",
                            f"train@{args.corpus}-{args.model}", asdict(spec),
                            preset=params.preset) as run:
        try:
            metrics = train_and_score(args.corpus, args.model, args.data, args.checkpoints,
                                      args.out, args.curve, params, run)
        except TrainingInterrupted as exc:
            print(f"{args.corpus} {args.model}: interrupted ({exc}); rerun `dvc repro` to "
                  "resume from there", file=sys.stderr)
            sys.exit(exc.exit_code)
        # written before the final MLflow calls: a broken store never costs the result
        write_json(args.metrics, metrics)
        run.log_metrics({k: v for k, v in metrics.items() if k.startswith(("valid_", "test_"))
                         or k in ("size", "train_seconds", "tokens_per_s")})
        run.log_artifact(args.metrics)
    print(f"{args.corpus} {args.model}: valid ppl {metrics['valid_ppl']:.2f}, "
          f"test ppl {metrics['test_ppl']:.2f} ({metrics['epochs']} epochs, "
          f"{metrics['train_seconds']:.0f} s on {metrics['device']})")


if __name__ == "__main__":
    main()
