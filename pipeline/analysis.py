"""What the trained recurrent models learned to carry, measured (the `analyse` stage's
work, pipeline/stages/analyse.py).

For every neural model of the corpus, on the `analyse.split` split:

    gradients.json     gradient flow over distance (pipeline/gradients.py), recurrent
                       models only, at initialisation (the very weights the training run
                       started from: same network and seed) and trained
    context.json       perplexity with the context truncated to k tokens against the
                       carried state (pipeline/context.py)
    dependencies.json  the long-range corpus only (pipeline/recall.py): per gap, the
                       loss at the dependent positions above the source's exact floor

Everything is logged to MLflow as run `<corpus>/analysis`; the report stage plots it.
Runs on the CPU: every analysis here takes seconds per model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoints import load_checkpoint, load_model
from pipeline.context import context_use
from pipeline.dataset import PreparedCorpus
from pipeline.errors import UserError
from pipeline.gradients import gradient_flow
from pipeline.lineup import is_ngram
from pipeline.networks import LanguageModel, NetworkConfig
from pipeline.params import require
from pipeline.recall import dependency_losses

RECURRENT = ("rnn", "gru", "lstm", "lstm2")


@dataclass(frozen=True)
class GradientParams:
    distance: int  # K: g(k) for k = 0..K back from the last position of a K+1-token window
    windows: int  # windows averaged, spread evenly over the split
    warmup: int  # tokens read before each window, to carry a state into it
    batch: int  # windows per backward pass (memory only)


@dataclass(frozen=True)
class ContextParams:
    lengths: tuple[int, ...]  # k: tokens of context after a reset
    targets: int  # targets scored, spread evenly over the first `span` tokens
    span: int  # the carried-state score reads these tokens of the split one by one
    batch_tokens: int  # context tokens per forward pass (memory only)


@dataclass(frozen=True)
class AnalyseParams:
    split: str  # the split the analyses read
    gradients: GradientParams
    context: ContextParams

    def validate(self, key: str) -> None:
        require(self.split in ("train", "valid", "test"), f"{key}.split",
                f"must be train, valid or test, got {self.split!r}")
        for name in ("distance", "windows", "warmup", "batch"):
            value = getattr(self.gradients, name)
            require(value > 0, f"{key}.gradients.{name}", f"must be positive, got {value}")
        for name in ("targets", "span", "batch_tokens"):
            value = getattr(self.context, name)
            require(value > 0, f"{key}.context.{name}", f"must be positive, got {value}")
        require(len(self.context.lengths) > 0 and min(self.context.lengths) > 0,
                f"{key}.context.lengths", f"must be positive, got {list(self.context.lengths)}")

    def check_split(self, tokens: int, key: str = "analyse") -> None:
        """Refuse gradient windows longer than the split they are drawn from."""
        g = self.gradients
        require(g.warmup + g.distance + 2 <= tokens, f"{key}.gradients.distance",
                f"a window of {g.distance} + 2 tokens after {g.warmup} of warm-up needs "
                f"{g.warmup + g.distance + 2:,} tokens; the {self.split} split has {tokens:,}")


def initial_model(path: Path) -> LanguageModel:
    """The untrained model a checkpoint's run started from (train_model seeds, then builds)."""
    ckpt = load_checkpoint(path)
    torch.manual_seed(ckpt["train"]["seed"])
    return LanguageModel(NetworkConfig(**ckpt["network"]))


def analyse_model(model_path: Path, ids: np.ndarray, *, kind: str, eos_id: int,
                  vocab_digest: str, params: AnalyseParams) -> tuple[dict, dict | None]:
    """(context record, gradient record or None for a non-recurrent model)."""
    trained = load_model(model_path, vocab_digest=vocab_digest)
    c = params.context
    context = context_use(trained, ids[: c.span], lengths=list(c.lengths), targets=c.targets,
                          eos_id=eos_id, batch_tokens=c.batch_tokens).record()
    if kind not in RECURRENT:
        return context, None
    g = params.gradients
    flows = {phase: gradient_flow(model, ids, distance=g.distance, windows=g.windows,
                                  warmup=g.warmup, batch=g.batch).record()
             for phase, model in (("init", initial_model(model_path)), ("trained", trained))}
    return context, flows


def analyse_corpus(corpus: str, data: Path, models_dir: Path, models: list[str],
                   params: AnalyseParams) -> dict[str, dict]:
    """{"gradients": {model: {phase: ...}}, "context": {model: ...}, ...} of one corpus."""
    prepared = PreparedCorpus(data)
    vocab = prepared.vocabulary()
    ids = np.asarray(prepared.ids(params.split))
    if any(model in RECURRENT for model in models):
        params.check_split(len(ids))
    out: dict[str, dict] = {"gradients": {}, "context": {}, "seconds": {}}
    for model in (m for m in models if not is_ngram(m)):
        path = models_dir / f"{model}.pt"
        if not path.exists():
            raise UserError(f"{path}: no trained {model} (run its train stage)")
        start = time.perf_counter()
        context, flows = analyse_model(path, ids, kind=model, eos_id=vocab.eos_id,
                                       vocab_digest=vocab.digest(), params=params)
        out["context"][model] = context
        if flows is not None:
            out["gradients"][model] = flows
        out["seconds"][model] = round(time.perf_counter() - start, 2)
        print(f"{corpus}/{model}: analysed in {out['seconds'][model]:.1f} s", flush=True)
    source = prepared.meta.get("source") or {}
    if source.get("dependencies"):
        out["dependencies"] = dependency_losses(
            {m: load_model(models_dir / f"{m}.pt", vocab_digest=vocab.digest())
             for m in out["context"]}, ids, vocab=vocab, source=source)
    return out


def metrics_of(results: dict) -> dict[str, float]:
    """The headline numbers, flat, for MLflow."""
    flat: dict[str, float] = {}
    for model, phases in results["gradients"].items():
        for phase, flow in phases.items():
            flat[f"{model}_grad_decay_{phase}"] = flow["decay_factor"]
            if flow["reach"] is not None:
                flat[f"{model}_grad_reach_{phase}"] = flow["reach"]
    for model, use in results["context"].items():
        flat[f"{model}_carried_ppl"] = use["carried_ppl"]
        for k, ppl in zip(use["lengths"], use["ppl"], strict=True):
            flat[f"{model}_context{k}_ppl"] = ppl
        if use["enough"] is not None:
            flat[f"{model}_context_enough"] = use["enough"]
    for model, gaps in (results.get("dependencies") or {}).get("models", {}).items():
        for gap, excess in zip(gaps["gaps"], gaps["excess_nats"], strict=True):
            flat[f"{model}_gap{gap}_excess_nats"] = excess
        if gaps.get("carried_gap") is not None:
            flat[f"{model}_carried_gap"] = gaps["carried_gap"]
    return flat
