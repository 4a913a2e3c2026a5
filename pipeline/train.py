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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline import tracking
from pipeline.atomic import atomic_path, write_json
from pipeline.dataset import PreparedCorpus
from pipeline.networks import KINDS, NetworkConfig
from pipeline.params import ParamsError, build, load_section, require
from pipeline.training import TrainConfig, evaluate_best, train_model

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
        for name in ("embedding_size", "hidden_size", "batch_size", "bptt", "epochs"):
            require(getattr(self, name) > 0, f"{key}.{name}",
                    f"must be positive, got {getattr(self, name)}")
        require(self.lr > 0, f"{key}.lr", f"must be positive, got {self.lr}")
        require(self.lr_decay >= 1, f"{key}.lr_decay", f"must be >= 1, got {self.lr_decay}")
        require(0 <= self.dropout < 1, f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")
        require(not self.tie_weights or self.embedding_size == self.hidden_size,
                f"{key}.tie_weights", "needs embedding_size == hidden_size, got "
                f"{self.embedding_size} and {self.hidden_size}")


@dataclass(frozen=True)
class TrainParams:
    preset: str
    models: tuple[str, ...]  # the neural models every corpus gets (dvc.yaml expands them)
    device: Literal["auto", "cpu", "cuda", "mps"]
    bf16: bool  # bfloat16 autocast for training on CUDA
    eval_chunk: int  # tokens per forward pass when scoring (does not change the result)
    presets: dict

    def validate(self, key: str) -> None:
        for model in self.models:
            require(model in KINDS, f"{key}.models",
                    f"unknown model {model!r}; known: {', '.join(KINDS)}")
        require(self.preset in self.presets, f"{key}.preset",
                f"unknown preset {self.preset!r}; defined: {', '.join(self.presets)}")
        require(self.eval_chunk > 0, f"{key}.eval_chunk", "must be positive")
        for model in self.models:
            for corpus in self.presets[self.preset].get("overrides", {}) or {}:
                self.spec(corpus, model)  # every combination must resolve
            self.spec("", model)

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
        return build(ModelSpec, {**preset[model], **overrides}, f"{key}.{model}")


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ParamsError("train.device: cuda requested but no CUDA device is available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def train_and_score(corpus: str, model: str, data_dir: Path, checkpoints: Path, out: Path,
                    curve: Path, params: TrainParams, run=None) -> dict:
    """Train (or resume) `model` on `corpus`, publish its best checkpoint, return metrics."""
    import torch

    data = PreparedCorpus(data_dir)
    vocab = data.vocabulary()
    spec = params.spec(corpus, model)
    device = pick_device(params.device)
    net = NetworkConfig(kind=model, vocab_size=len(vocab), embedding_size=spec.embedding_size,
                        hidden_size=spec.hidden_size, context=spec.context,
                        dropout=spec.dropout, tie_weights=spec.tie_weights,
                        direct_connections=spec.direct_connections,
                        init_range=spec.init_range)
    cfg = TrainConfig(batch_size=spec.batch_size, bptt=spec.bptt, epochs=spec.epochs,
                      optimizer=spec.optimizer, lr=spec.lr, schedule=spec.schedule,
                      lr_decay=spec.lr_decay, decay_after=spec.decay_after, clip=spec.clip,
                      time_budget_s=spec.time_budget_s, seed=spec.seed,
                      eval_chunk=params.eval_chunk)
    history: list[dict] = []

    def on_epoch(record: dict) -> None:
        history.append(record)
        write_json(curve, history)  # DVC plots: learning curve so far
        if run is not None:
            # "epoch_" names keep the curves apart from the final (best-checkpoint) scores
            run.log_metrics({f"epoch_{k}": v for k, v in record.items() if k != "epoch"},
                            step=record["epoch"])

    extra = {"vocab_digest": vocab.digest(), "corpus": corpus, "preset": params.preset,
             "resolved_params": asdict(spec)}
    try:
        result = train_model(net, cfg, data.ids("train"), data.ids("valid"), vocab.eos_id,
                             checkpoints, device, on_epoch, params.bf16, extra)
    except torch.OutOfMemoryError as exc:
        raise RuntimeError(
            f"{device} ran out of memory training {corpus}/{model} with batch_size "
            f"{spec.batch_size}: lower train.presets.{params.preset}.{model}.batch_size "
            f"(or bptt / hidden_size). {exc}"
        ) from None
    write_json(curve, result["history"])
    with atomic_path(out) as tmp:
        shutil.copyfile(checkpoints / "best.pt", tmp)
    history = result["history"]
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
        "tokens_per_s": round(float(np.mean([r["tokens_per_s"] for r in history])), 1),
        "device": device,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "preset": params.preset,
        "scoring": "one stream per split, state carried across chunks",
        "vocab_size": len(vocab),
        "vocab_digest": vocab.digest(),
    }
    for split in ("valid", "test"):
        score = evaluate_best(checkpoints, data.ids(split), vocab.eos_id, params.eval_chunk,
                              device)
        expected = data.meta["tokens_per_split"][split]
        assert score.tokens == expected, (score.tokens, expected)
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
        metrics = train_and_score(args.corpus, args.model, args.data, args.checkpoints,
                                  args.out, args.curve, params, run)
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
