"""Checkpoint files: written atomically (optionally on a thread), checked, loaded.

Checkpoints are state dicts plus plain data, loadable with weights_only=True; a
damaged one (a full disk, a power cut) is detected by the CRC-32 checksums of its
zip members and moved aside. The sample and analyse stages need only this module
(load_model), not the training loop.
"""

from __future__ import annotations

import os
import threading
import zipfile
from pathlib import Path

import torch

from pipeline.atomic import atomic_path
from pipeline.errors import UserError
from pipeline.networks import LanguageModel, NetworkConfig


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: damaged, or from another vocabulary."""


def save_checkpoint(path: Path, payload: dict, background: bool = False) -> None:
    """Write `payload` to `path` atomically. `background` (a GPU run): snapshot its
    tensors to host memory now and write on a thread while training goes on, one file at
    a time; wait_for_checkpoints() returns once written (and raises what the write did)."""
    if not background:
        with atomic_path(path) as tmp:  # synced to disk before it replaces `path`
            torch.save(payload, tmp)
        return
    snapshot = _on_host(payload)  # the weights change at the next step
    wait_for_checkpoints()
    _WRITER["thread"] = threading.Thread(target=_write_in_background,
                                         args=(path, snapshot), name="checkpoint")
    _WRITER["thread"].start()


_WRITER: dict = {"thread": None, "error": None}  # the one background write in flight


def _write_in_background(path: Path, payload: dict) -> None:
    try:
        save_checkpoint(path, payload)
    except BaseException as exc:  # handed to the training thread by wait_for_checkpoints
        _WRITER["error"] = exc


def wait_for_checkpoints() -> None:
    """Block until the background checkpoint write (if any) is on disk."""
    thread, _WRITER["thread"] = _WRITER["thread"], None
    if thread is not None:
        thread.join()
    error, _WRITER["error"] = _WRITER["error"], None
    if error is not None:
        raise error


def _on_host(value):
    """A copy of `value` (nested dicts, lists, tuples of tensors and plain data) whose
    tensors are in host memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_host(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_host(v) for v in value)
    return value


def check_checkpoint(path: Path) -> None:
    """Raise CheckpointError if `path` is truncated or damaged (a full disk, a power cut):
    torch.save writes a zip archive whose members carry CRC-32 checksums, all verified
    here. The damaged file is moved aside to `<name>.corrupt`, so that the next run does
    not find it again."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        problem = f"member {bad} fails its CRC check" if bad else None
    except (zipfile.BadZipFile, EOFError) as exc:
        problem = f"not a complete zip archive: {exc}"
    if problem is not None:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({problem}); "
                              f"moved it to {aside}")


def load_checkpoint(path: Path, device: str = "cpu") -> dict:
    """A checkpoint as plain data and tensors (weights_only: no code is unpickled).
    Raises CheckpointError for a damaged file (see check_checkpoint)."""
    check_checkpoint(path)
    return torch.load(path, weights_only=True, map_location=device)


def load_model(path: Path, device: str = "cpu",
               vocab_digest: str | None = None) -> LanguageModel:
    """The model of a best checkpoint; refuses one trained on another vocabulary, or a
    damaged one (moved aside: `dvc repro` then sees the output missing and rebuilds it)."""
    try:
        ckpt = load_checkpoint(path, device)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; rerun `dvc repro` to publish it again") from None
    if vocab_digest is not None and ckpt.get("vocab_digest") != vocab_digest:
        raise CheckpointError(f"{path} was trained on another vocabulary; retrain it")
    model = LanguageModel(NetworkConfig(**ckpt["network"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model
