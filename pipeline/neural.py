"""One neural language model's benchmark run on one corpus: check, train (or resume),
publish the best checkpoint, score it (the `train` stage's work, pipeline/stages/train.py).

The configuration is the preset `train.preset` resolved for this corpus and model
(pipeline/presets.py); the loop itself is pipeline/training.py. The best checkpoint (by
validation perplexity) is published, and valid/test perplexity of that best model come
from the one stream scorer. The metrics also record the figures that published protocols
select (`protocols`: the last epoch's model, the best end-of-epoch validation point), for
like-for-like comparisons. Under several ranks every rank trains and rank 0 alone
publishes and scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline import distributed
from pipeline.atomic import atomic_path, write_json
from pipeline.checkpoints import load_checkpoint, load_model
from pipeline.dataset import DataError, PreparedCorpus
from pipeline.errors import UserError
from pipeline.networks import LanguageModel
from pipeline.params import ParamsError
from pipeline.perplexity import SplitScore, score_stream, scoring_setup
from pipeline.precision import LABELS, training_precision
from pipeline.presets import TrainParams
from pipeline.training import Runtime, Splits, train_model

DESCRIPTIONS = {
    "window": "fixed-window neural LM (Bengio et al. 2003)",
    "rnn": "Elman RNN (tanh), 1 layer",
    "gru": "GRU, 1 layer",
    "lstm": "LSTM, 1 layer",
    "lstm2": "LSTM, 2 layers",
}


class OutOfMemory(UserError, RuntimeError):
    pass


def precision_of(device: str, params: TrainParams, model: str) -> str:
    """The precision `model`'s training steps run in on `device` (pipeline/precision.py):
    train.cuda_precision.<model> on CUDA, train.cpu_precision on a CPU."""
    return training_precision(device, cuda=params.cuda_precision[model],
                              cpu=params.cpu_precision)


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


@contextlib.contextmanager
def out_of_memory_advice(corpus: str, model: str, device: str, params: TrainParams,
                         scoring: bool = False) -> Iterator[None]:
    """Turn running out of memory into OutOfMemory naming the params key to lower:
    train.eval_chunk while scoring a split (`scoring`, or a validation point inside
    training), else the model's batch_size."""
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError saying so
        if not isinstance(exc, torch.OutOfMemoryError) and \
                "can't allocate memory" not in str(exc):
            raise
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if scoring or _raised_in(exc, "validate"):
            raise OutOfMemory(
                f"{device} ran out of memory scoring {corpus}/{model} with eval_chunk "
                f"{params.eval_chunk}: lower train.eval_chunk (tokens per scoring pass; the "
                f"perplexity does not depend on it). {said}") from None
        batch_size, key = batch_size_of(params, corpus, model)
        raise OutOfMemory(
            f"{device} ran out of memory training {corpus}/{model} with batch_size "
            f"{batch_size}: lower {key} (or bptt / hidden_size; "
            f"a corpora.{corpus} entry changes only this corpus). {said}"
        ) from None


def _raised_in(exc: BaseException, function: str) -> bool:
    """Whether the traceback of `exc` passes through a function of that name."""
    return any(frame.f_code.co_name == function for frame, _ in traceback.walk_tb(
        exc.__traceback__))


def batch_size_of(params: TrainParams, corpus: str, model: str) -> tuple[int, str]:
    """The model's batch size on this corpus (columns) and the params key that sets it
    (the preset layer it comes from), for messages that say what to change."""
    where = params.resolve(corpus, model)["batch_size"][1]
    return params.spec(corpus, model).training.batch_size, f"{where}.batch_size"


def check_ranks(params: TrainParams, corpus: str, model: str, ranks: int) -> None:
    """ParamsError naming the key unless the batch columns split evenly across ranks."""
    batch_size, key = batch_size_of(params, corpus, model)
    if batch_size % ranks:
        raise ParamsError(f"{key}: {batch_size} columns cannot be split "
                          f"evenly across {ranks} ranks (train.nproc, or torchrun's "
                          f"--nproc-per-node x --nnodes); make it a multiple of {ranks}")


# Selection protocols of published results (pipeline/references.py compares under these
# names): the model after the last epoch; the best of the validation points on epoch ends.
LAST_EPOCH, BEST_EPOCH_END = "last epoch", "best end-of-epoch validation"


def protocol_scores(history: list[dict], steps_per_epoch: int, best_step: int,
                    best_test: float, score_last: Callable[[], float]) -> dict:
    """protocol -> {step, epoch, valid_ppl, test_ppl} of the point it selects from the curve
    (ties: the first). LAST_EPOCH only for a run that ends on an epoch end. The test ppl is
    `best_test` for the best point (best.pt), `score_last()` for the last point (the final
    resume point holds its weights), None for a point whose weights no checkpoint keeps (an
    epoch end beaten by a mid-epoch point and not the last: validate once an epoch,
    evals_per_epoch 1, to keep it)."""
    last = history[-1]
    ends = [r for r in history if r["step"] % steps_per_epoch == 0]
    chosen = {LAST_EPOCH: last} if last["step"] % steps_per_epoch == 0 else {}
    if ends:
        chosen[BEST_EPOCH_END] = min(ends, key=lambda r: r["valid_ppl"])
    scored: dict[int, float | None] = {best_step: best_test}
    if any(point is last for point in chosen.values()) and last["step"] not in scored:
        scored[last["step"]] = score_last()
    return {protocol: {"step": point["step"], "epoch": point["epoch"],
                       "valid_ppl": round(point["valid_ppl"], 4),
                       "test_ppl": None if scored.get(point["step"]) is None
                       else round(scored[point["step"]], 4)}
            for protocol, point in chosen.items()}


def final_test_ppl(resume: Path, network, step: int, ids, tokens: int, eval_chunk: int,
                   eos_id: int, device: str) -> float:
    """The test split's perplexity under the weights of a finished run's final resume point
    (last.pt, written at its last validation point, `step`); `tokens`: the count expected."""
    ckpt = load_checkpoint(resume, device)
    if ckpt["progress"]["step"] != step:
        raise RuntimeError(f"{resume} holds step {ckpt['progress']['step']}, not the run's "
                           f"last point {step}")
    model = LanguageModel(network).to(device)
    model.load_state_dict(ckpt["model"])
    score = score_stream(model, ids, eval_chunk, eos_id, device)
    if score.tokens != tokens:
        raise RuntimeError(f"scored {score.tokens} test tokens, prepare counted {tokens}")
    return score.perplexity


def train_and_score(corpus: str, model: str, data_dir: Path, checkpoints: Path, out: Path,
                    curve: Path, params: TrainParams, run=None,
                    world: distributed.World = distributed.SINGLE) -> dict | None:
    """Train (or resume) `model` on `corpus`, publish its best checkpoint, return metrics.
    Under several ranks (`world`) every rank trains; rank 0 alone publishes, scores and
    returns the metrics, the others return None. `run`: the MLflow run the curve goes to."""
    data = PreparedCorpus(data_dir)
    runtime = checked_runtime(corpus, model, data, params, world=world,
                              checkpoints=checkpoints, on_eval=CurveLog(curve, run))
    result = train(corpus, model, data, params, runtime)
    if not world.is_main:
        return None
    runtime.on_eval(result["history"])  # a run found finished: its curve, logged and written
    with atomic_path(out) as tmp:  # publish
        shutil.copyfile(checkpoints / "best.pt", tmp)
    return score(corpus, model, data, params, runtime=runtime, result=result, published=out)


class CurveLog:
    """on_eval: the learning curve so far, each new point logged to the MLflow run `run`
    (None: no run) and the whole curve written to `curve` (DVC plots)."""

    def __init__(self, curve: Path, run=None) -> None:
        self.curve, self.run = curve, run
        self.logged = 0  # curve points already logged to this MLflow run

    def __call__(self, history: list[dict]) -> None:
        # "curve_" names keep the curve apart from the final (best-checkpoint) scores;
        # the step is the number of training tokens seen, the fair axis across models.
        # A resumed run logs the points from before the resume too (a new MLflow run).
        for record in history[self.logged:]:
            if self.run is not None:
                self.run.log_metrics({f"curve_{k}": v for k, v in record.items()
                                      if k != "tokens"}, step=record["tokens"])
        self.logged = len(history)
        write_json(self.curve, history)  # DVC plots: the learning curve so far


def checked_runtime(corpus: str, model: str, data: PreparedCorpus, params: TrainParams, *,
                    world: distributed.World, checkpoints: Path,
                    on_eval: Callable[[list[dict]], None]) -> Runtime:
    """How this run executes (device, precision, CUDA graphs, ranks), after checking what
    would fail later: <eos> at id 0, the columns split evenly across ranks, and enough
    training tokens for the batch. A UserError naming the key otherwise."""
    vocab = data.vocabulary()
    if vocab.eos_id != 0:  # the window model's start context is id 0 (see networks.py)
        raise DataError(f"{data.folder}: <eos> must be token id 0 (rerun prepare)")
    check_ranks(params, corpus, model, world.size)
    device = distributed.rank_device(pick_device(params.device), world.local_rank) \
        if world.distributed else pick_device(params.device)
    precision = precision_of(device, params, model)
    graphs = params.cuda_graphs and device.startswith("cuda") and not world.distributed
    # in the resume fingerprint: a run never continues in another precision or step
    extra = {"vocab_digest": vocab.digest(), "corpus": corpus,
             "precision": LABELS[precision], **({"step": "cuda graph"} if graphs else {})}
    batch_size, key = batch_size_of(params, corpus, model)
    train_tokens = len(data.ids("train"))
    if train_tokens < batch_size + 1:
        raise ParamsError(f"{key}: {batch_size} columns need at least "
                          f"{batch_size + 1} training tokens, {corpus}'s train split has "
                          f"{train_tokens} (a corpora.{corpus} entry changes only this corpus)")
    return Runtime(checkpoint_dir=checkpoints, device=device, precision=precision,
                   graphs=graphs, eval_chunk=params.eval_chunk,
                   checkpoint_every_s=params.checkpoint_every_s, extra=extra,
                   on_eval=on_eval, world=world)


def train(corpus: str, model: str, data: PreparedCorpus, params: TrainParams,
          runtime: Runtime) -> dict:
    """train_model's summary of this corpus and model (every rank); running out of
    memory becomes OutOfMemory naming the key to lower."""
    world, vocab = runtime.world, data.vocabulary()
    spec = params.spec(corpus, model)
    ranks = f" x {world.size} ranks" if world.distributed else ""
    if world.is_main:
        print(f"{corpus} {model}: training on {runtime.device}{ranks} ({params.preset} "
              "preset)", flush=True)
    sized = dataclasses.replace(spec, network=spec.for_vocabulary(len(vocab)))
    splits = Splits(train=data.ids("train"), valid=data.ids("valid"), eos_id=vocab.eos_id)
    with out_of_memory_advice(corpus, model, runtime.device, params):
        return train_model(sized, splits, runtime)


def score(corpus: str, model: str, data: PreparedCorpus, params: TrainParams, *,
          runtime: Runtime, result: dict, published: Path) -> dict:
    """The metrics of a finished run: its record (`describe`), the whole valid and test
    splits scored under the published best weights, and the protocols' figures."""
    vocab, device, history = data.vocabulary(), runtime.device, result["history"]
    metrics = describe(corpus, model, data, params, runtime=runtime, result=result)
    best = load_model(published, device, vocab.digest())
    chosen = load_checkpoint(published).get("valid_score")  # valid, scored when chosen
    for split in ("valid", "test"):
        if split == "valid" and chosen is not None and \
                chosen["setup"] == scoring_setup(params.eval_chunk, device):
            # the same weights under the same scoring setup give the same number: not
            # scored twice (a finished run found under another scorer or machine is)
            split_score = SplitScore(chosen["nll"], chosen["tokens"])
        else:
            with out_of_memory_advice(corpus, model, device, params, scoring=True):
                split_score = score_stream(best, data.ids(split), params.eval_chunk,
                                           vocab.eos_id, device)
        expected = data.meta["tokens_per_split"][split]
        if split_score.tokens != expected:
            raise RuntimeError(f"scored {split_score.tokens} tokens of {split}, prepare "
                               f"counted {expected}")
        metrics.update(split_score.metrics(split, vocab.level))
    network = params.spec(corpus, model).for_vocabulary(len(vocab))
    with out_of_memory_advice(corpus, model, device, params, scoring=True):
        metrics["protocols"] = protocol_scores(
            history, steps_per_epoch=result["plan"]["steps_per_epoch"],
            best_step=result["best_step"], best_test=metrics["test_ppl"],
            score_last=lambda: final_test_ppl(
                runtime.checkpoint_dir / "last.pt", network, step=history[-1]["step"],
                ids=data.ids("test"), tokens=metrics["test_tokens"],
                eval_chunk=params.eval_chunk, eos_id=vocab.eos_id, device=device))
    return metrics


def describe(corpus: str, model: str, data: PreparedCorpus, params: TrainParams, *,
             runtime: Runtime, result: dict) -> dict:
    """What the metrics file says of the run besides its scores (the keys in file order)."""
    vocab, history, world = data.vocabulary(), result["history"], runtime.world
    return {
        "corpus": corpus,
        "model": model,
        "family": "neural",
        "description": DESCRIPTIONS[model],
        "level": vocab.level,
        "size": result["parameters"],
        "size_unit": "parameters",
        "train_seconds": round(result["seconds"], 1),
        "tokens_per_s": round(result["tokens"] / result["seconds"], 1),
        "device": runtime.device,
        "precision": f"training {runtime.extra['precision']}, scoring fp32",
        **({"step": runtime.extra["step"]} if runtime.graphs else {}),
        "train_tokens": result["tokens"],
        "epochs": result["epochs"],
        "best_step": result["best_step"],
        "best_epoch": next(r["epoch"] for r in history if r["step"] == result["best_step"]),
        "preset": params.preset,
        "config": params.spec(corpus, model).flat(),
        "scoring": "one stream per split, state carried across chunks",
        "vocab_size": len(vocab),
        "vocab_digest": vocab.digest(),
        **({"ranks": world.size} if world.distributed else {}),
    }
