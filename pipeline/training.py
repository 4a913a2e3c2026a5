"""One training loop for every neural model (truncated BPTT over the token stream).

The training split is cut into `batch_size` contiguous columns; each step reads the
next `bptt` tokens of every column, with the state carried from the step before
and detached (truncated back-propagation through time):

    stream  a b c d e f g h i j k l          batch_size = 3, bptt = 2
    column 0: a b | c d        step 1 reads [a b], [e f], [i j]
    column 1: e f | g h        step 2 reads [c d], [g h], [k l]
    column 2: i j | k l

Checkpoints (state dicts plus plain data, loadable with weights_only=True):
`last.pt` is the resume point. It is written after every epoch, every
`checkpoint_every_s` seconds of training, and when SIGINT (Ctrl-C) or SIGTERM
arrives; a mid-epoch one also holds the position in the epoch, the carried
state and the RNG state, so a resumed run continues exactly where the
interrupted one stopped and ends with the same numbers. It is used only when
its fingerprint of configuration, data and training code matches. `best.pt`
holds the model at the best validation perplexity. Validation uses the exact
stream scorer of pipeline/perplexity.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.networks import LanguageModel, NetworkConfig, detach
from pipeline.perplexity import SplitScore, stream_nll


class TrainingDiverged(RuntimeError):
    pass


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(f"{signal_name}: {message}")
        self.exit_code = 128 + signal.Signals[signal_name].value  # as if the signal killed it


class _StopOnSignal:
    """Turns SIGINT/SIGTERM into a request that the loop honours between steps, so the
    checkpoint it then writes is consistent (never a half-applied optimizer step). A
    second signal acts at once, as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals need it
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int
    bptt: int
    epochs: int
    optimizer: Literal["sgd", "adam"]
    lr: float
    schedule: Literal["decay", "plateau"]  # decay: lr /= lr_decay after each epoch >= decay_after
    lr_decay: float  # plateau: lr /= lr_decay when validation does not beat the best so far
    decay_after: int
    clip: float  # gradient-norm clip; 0 = off
    time_budget_s: float  # training seconds after which the run stops (mid-epoch); 0 = none
    seed: int


def batchify(ids: np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch_size, L): contiguous columns of the stream."""
    stream = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    length = (len(stream) - 1) // batch_size
    if length < 1:
        raise ValueError(f"{len(stream)} tokens cannot fill a batch of {batch_size} columns")
    x = stream[: length * batch_size].view(batch_size, length)
    y = stream[1 : length * batch_size + 1].view(batch_size, length)
    return x, y


def fingerprint(net_cfg: NetworkConfig, cfg: TrainConfig, train_ids: np.ndarray,
                valid_ids: np.ndarray) -> str:
    """What a resume point must match: configuration, data and the training code.
    (Scoring code may change: a finished run is then only re-scored.)"""
    h = hashlib.sha256()
    h.update(json.dumps([asdict(net_cfg), asdict(cfg)], sort_keys=True).encode())
    h.update(np.ascontiguousarray(train_ids).tobytes())
    h.update(np.ascontiguousarray(valid_ids).tobytes())
    for module in ("networks.py", "training.py"):
        h.update((Path(__file__).parent / module).read_bytes())
    return h.hexdigest()[:20]


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, device: str = "cpu") -> dict:
    """A checkpoint as plain data and tensors (weights_only: no code is unpickled)."""
    return torch.load(path, weights_only=True, map_location=device)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_device(state, device: str):
    """A carried recurrent state (None, a tensor or a tuple of them) on `device`."""
    if state is None:
        return None
    if isinstance(state, tuple | list):
        return tuple(s.to(device) for s in state)
    return state.to(device)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def next_lr(cfg: TrainConfig, epoch: int, lr: float, improved: bool) -> float:
    """The learning rate after `epoch`: fixed decay from decay_after on (Zaremba et al.),
    or divide-on-plateau when the epoch did not beat the best validation so far."""
    if (cfg.schedule == "decay" and epoch >= cfg.decay_after) or \
            (cfg.schedule == "plateau" and not improved):
        return lr / cfg.lr_decay
    return lr


def train_model(net_cfg: NetworkConfig, cfg: TrainConfig, train_ids: np.ndarray,
                valid_ids: np.ndarray, eos_id: int, checkpoint_dir: Path, device: str = "cpu",
                on_epoch: Callable[[dict], None] | None = None, bf16: bool = False,
                extra: dict | None = None, eval_chunk: int = 512,
                checkpoint_every_s: float = 0) -> dict:
    """Train, resuming from checkpoint_dir/last.pt when it was written for the same
    configuration, data and code; return a summary. `extra` (plain data) is stored in
    the checkpoints; `eval_chunk` only sets the scorer's pass length and
    `checkpoint_every_s` (0 = epoch ends only) how often a mid-epoch resume point is
    written; neither changes the result. Raises TrainingInterrupted on SIGINT/SIGTERM,
    after writing a resume point."""
    torch.manual_seed(cfg.seed)
    autocast = bf16 and device.startswith("cuda")
    model = LanguageModel(net_cfg).to(device)
    opt = (torch.optim.SGD(model.parameters(), lr=cfg.lr) if cfg.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=cfg.lr))
    x, y = batchify(train_ids, cfg.batch_size)
    steps_per_epoch = math.ceil(x.size(1) / cfg.bptt)
    key = fingerprint(net_cfg, cfg, train_ids, valid_ids)
    history: list[dict] = []
    start_epoch, best_valid, lr, elapsed = 1, math.inf, cfg.lr, 0.0
    position = None  # where a mid-epoch resume point left off
    last = checkpoint_dir / "last.pt"
    ckpt = load_checkpoint(last) if last.exists() else None  # on the CPU: RNG states
    if ckpt is not None and ckpt.get("fingerprint") != key:
        print(f"{last} belongs to another configuration, data or code: training from scratch")
    elif ckpt is not None:
        position = ckpt.get("position")
        where = (f"epoch {position['epoch']}, step {position['step']} of {steps_per_epoch}"
                 if position else f"epoch {ckpt['epoch']} done")
        print(f"resuming from {last} ({where})")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        start_epoch, best_valid, lr = ckpt["epoch"] + 1, ckpt["best_valid"], ckpt["lr"]
        history, elapsed = ckpt["history"], ckpt["elapsed"]

    def save_resume_point(epoch_done: int, elapsed: float, position: dict | None) -> None:
        save_checkpoint(last, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(),
            "fingerprint": key, "epoch": epoch_done, "best_valid": best_valid, "lr": lr,
            "history": history, "elapsed": elapsed, "position": position, **(extra or {})})

    with _StopOnSignal() as stop:
        print(f"training {model.num_parameters():,} parameters: {cfg.epochs} epochs of "
              f"{steps_per_epoch} steps; Ctrl-C saves a resume point", flush=True)
        for epoch in range(start_epoch, cfg.epochs + 1):
            if cfg.time_budget_s and elapsed >= cfg.time_budget_s:
                break
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            # the epoch so far: nothing, or what a mid-epoch resume point recorded
            first_step, state, nll, count, epoch_seconds = 0, None, 0.0, 0, 0.0
            if position is not None:
                first_step, state = position["step"], _to_device(position["state"], device)
                nll, count, epoch_seconds = position["nll"], position["count"], position["seconds"]
                position = None
            t0 = last_save = time.perf_counter()
            bar = tqdm(range(first_step, steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}",
                       unit=" step", initial=first_step, total=steps_per_epoch, leave=False,
                       disable=None)  # None: no bar when output is not a terminal (logs)
            for step in bar:
                xb = x[:, step * cfg.bptt : (step + 1) * cfg.bptt].to(device)  # (B, T)
                yb = y[:, step * cfg.bptt : (step + 1) * cfg.bptt].to(device)  # (B, T)
                state = detach(state)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    _, loss, state = model(xb, yb, state)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch}, step {step}: "
                        f"lower the learning rate (lr={lr}) or enable gradient clipping"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
                nll += loss.item() * yb.numel()
                count += yb.numel()
                now = time.perf_counter()
                bar.set_postfix(loss=f"{loss.item():.3f}",
                                tok_s=f"{count / (epoch_seconds + now - t0):.0f}")
                over_budget = (cfg.time_budget_s
                               and elapsed + epoch_seconds + now - t0 >= cfg.time_budget_s)
                if over_budget or step + 1 == steps_per_epoch:
                    break  # the epoch is over (the budget may end it early)
                if stop.requested or (checkpoint_every_s and now - last_save >= checkpoint_every_s):
                    # elapsed: finished epochs only; this epoch's seconds are the position's
                    save_resume_point(epoch - 1, elapsed, {
                        "epoch": epoch, "step": step + 1, "state": detach(state), "nll": nll,
                        "count": count, "seconds": epoch_seconds + now - t0})
                    last_save = time.perf_counter()
                    if stop.requested:
                        bar.close()
                        raise TrainingInterrupted(
                            stop.requested, f"stopped at epoch {epoch}, step {step + 1} of "
                            f"{steps_per_epoch}; the resume point is {last}")
            bar.close()
            seconds = epoch_seconds + time.perf_counter() - t0
            elapsed += seconds
            valid_nll, valid_tokens = stream_nll(model, valid_ids, eval_chunk, eos_id, device)
            if not valid_nll / valid_tokens < 700:  # also catches NaN; exp() would overflow
                raise TrainingDiverged(
                    f"validation loss {valid_nll / valid_tokens:.3g} nats/token after epoch "
                    f"{epoch}: the run diverged; lower the learning rate (lr={lr}) or clip "
                    "gradients"
                )
            valid = SplitScore(valid_nll, valid_tokens)
            record = {"epoch": epoch, "train_ppl": math.exp(min(nll / count, 700)),
                      "valid_ppl": valid.perplexity, "lr": lr, "tokens": count,
                      "tokens_per_s": count / seconds, "elapsed_s": elapsed}
            history.append(record)
            improved = valid.perplexity < best_valid
            if improved:
                best_valid = valid.perplexity
                save_checkpoint(checkpoint_dir / "best.pt", {
                    "model": model.state_dict(), "network": asdict(net_cfg),
                    "train": asdict(cfg), "epoch": epoch, "valid_ppl": best_valid,
                    **(extra or {})})
            lr = next_lr(cfg, epoch, lr, improved)
            save_resume_point(epoch, elapsed, None)
            if on_epoch is not None:
                on_epoch(record)
            if stop.requested:
                raise TrainingInterrupted(stop.requested, f"stopped after epoch {epoch}; "
                                          f"the resume point is {last}")
    if not history:
        raise TrainingDiverged("no epoch finished: raise epochs or time_budget_s")
    return {"history": history, "best_valid_ppl": best_valid,
            "parameters": model.num_parameters(), "seconds": elapsed}


def load_model(path: Path, device: str = "cpu",
               vocab_digest: str | None = None) -> LanguageModel:
    """The model of a best checkpoint; refuses one trained on another vocabulary."""
    ckpt = load_checkpoint(path, device)
    if vocab_digest is not None and ckpt.get("vocab_digest") != vocab_digest:
        raise ValueError(f"{path} was trained on another vocabulary; retrain it")
    model = LanguageModel(NetworkConfig(**ckpt["network"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model
