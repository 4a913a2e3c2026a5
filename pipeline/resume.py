"""Resume points: checkpoint_dir/last.pt holds the model, optimizer, RNG and Progress.

`last.pt` is used only when its fingerprint of configuration, data, `extra`
(the vocabulary digest among it) and training code matches; a resumed run
continues exactly (same batches, state, RNG) and ends with the same numbers.
The training code is the source of every pipeline module the loop imports
(pipeline/imports.py reads them off the imports), the scorer aside.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoints import (
    CheckpointError,
    check_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.distributed import RANK_SEED_STRIDE, SINGLE, World
from pipeline.imports import PACKAGE, imported_closure
from pipeline.networks import NetworkConfig, detach
from pipeline.schedule import TrainConfig

LOOP = PACKAGE / "training.py"  # the training loop: its imports are the training code
# a scorer change only re-scores a finished run (see perplexity.scoring_setup)
RESCORED = frozenset({PACKAGE / "perplexity.py"})


@dataclass
class Progress:
    """Everything a resumed run needs besides the model and optimizer (plain data)."""

    lr: float  # the epoch-level lr (decay/plateau schedules)
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen
    seconds: float = 0.0  # training time, validation excluded
    best_valid: float = math.inf
    best_step: int = 0
    plateaus: int = 0  # epochs that did not improve validation (schedule.improved)
    history: list = field(default_factory=list)
    segment_losses: list = field(default_factory=list)  # per-step nats since the last
    # validation point (summed with math.fsum)
    segment_grad_norms: list = field(default_factory=list)  # per-step norms before clipping
    segment_tokens: int = 0
    segment_seconds: float = 0.0
    state: object = None  # the carried recurrent state (tensors) mid-epoch


def _rng_state() -> dict:
    """Every generator dropout may draw from (CPU, CUDA, MPS)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def _to_device(state, device: str):
    """A carried recurrent state (None, a tensor or a tuple of them) on `device`."""
    if state is None:
        return None
    if isinstance(state, tuple | list):
        return tuple(s.to(device) for s in state)
    return state.to(device)


def fingerprint(net_cfg: NetworkConfig, cfg: TrainConfig, train_ids: np.ndarray,
                valid_ids: np.ndarray, extra: dict) -> str:
    """What a resume point must match: configuration, data, `extra` and the training code
    (training_code). Scoring code may change: a finished run is then only re-scored."""
    h = hashlib.sha256()
    h.update(json.dumps([asdict(net_cfg), asdict(cfg), extra], sort_keys=True).encode())
    for ids in (train_ids, valid_ids):  # a memory map, hashed a block at a time
        for start in range(0, len(ids), 1 << 22):
            h.update(np.ascontiguousarray(ids[start : start + (1 << 22)]).tobytes())
    for module in training_code():
        h.update(module.read_bytes())
    return h.hexdigest()[:20]


@dataclass
class ResumePoint:
    """checkpoint_dir/last.pt: the model, optimizer, RNG and Progress of a run."""

    path: Path
    key: str  # fingerprint()
    extra: dict  # plain data stored with it (corpus, vocabulary digest, ...)
    world: World = SINGLE  # the ranks that share it
    background: bool = False  # written on a thread (GPU runs: training does not wait)

    def save(self, model: torch.nn.Module, opt: torch.optim.Optimizer,
             progress: Progress) -> None:
        """Write last.pt. Under several ranks every rank calls it (a collective): rank 0
        gathers the state of all B columns and every rank's RNG, and writes alone."""
        world = self.world
        state, rng = world.gather_columns(progress.state), world.gather(_rng_state())
        if not world.is_main:
            return
        plain = asdict(progress) | {"state": detach(state)}
        ranks = {"world_size": world.size, "rng_ranks": rng} if world.distributed else {}
        save_checkpoint(self.path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "rng": rng[0], "fingerprint": self.key,
                                    "progress": plain, **ranks, **self.extra},
                        background=self.background)

    def load(self, model: torch.nn.Module, opt: torch.optim.Optimizer,
             device: str) -> Progress | None:
        """The saved Progress (model, optimizer and RNG restored), or None to start over.
        Under several ranks rank 0 reads last.pt and broadcasts it; each rank keeps its
        own columns of the carried state (saved for all B) and its own RNG."""
        world = self.world
        ckpt = self._read() if world.is_main else None
        ckpt = world.broadcast(ckpt)
        if ckpt is None:
            return None
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        _restore_rng(ckpt, world)
        progress = Progress(**ckpt["progress"])
        progress.state = _to_device(world.own_columns(progress.state), device)
        return progress

    def _read(self) -> dict | None:
        """The checkpoint if it is intact and of this run (on the CPU), else None."""
        if not self.path.exists():
            return None
        try:
            ckpt = load_checkpoint(self.path)  # on the CPU: RNG states must stay there
            if ckpt.get("fingerprint") == self.key and ckpt.get("progress", {}).get("history"):
                check_checkpoint(self.path.with_name("best.pt"))  # validated: the run's best
        except (CheckpointError, FileNotFoundError) as exc:
            print(f"{exc}: training from scratch", flush=True)
            return None
        if ckpt.get("fingerprint") != self.key or "progress" not in ckpt:
            print(f"{self.path} belongs to another configuration, data or code: "
                  "training from scratch")
            return None
        return ckpt


def _restore_rng(ckpt: dict, world: World) -> None:
    """This rank's saved RNG. A checkpoint written by another number of ranks continues
    the model exactly but not the dropout masks: ranks > 0 then draw anew."""
    saved = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(saved) == world.size:
        _set_rng_state(saved[world.rank])
        return
    _set_rng_state(saved[0])
    if world.rank > 0:
        torch.manual_seed(RANK_SEED_STRIDE * world.rank + ckpt["progress"]["step"])
    if world.is_main:
        print(f"resume point written by {len(saved)} rank(s), resumed by {world.size}: "
              "dropout masks differ from an uninterrupted run")


def training_code() -> list[Path]:
    """The source files a resume point's fingerprint covers: every pipeline module the
    training loop imports, directly or not, but the scorer (RESCORED), in a fixed order."""
    return sorted(imported_closure(LOOP) - RESCORED)
