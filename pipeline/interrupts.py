"""Stopping a training run cleanly: SIGINT/SIGTERM become a request the loop honours
between steps (pipeline/training.py), after writing a resume point; under several
ranks the ranks agree on it first, so every rank saves and stops alike.
"""

from __future__ import annotations

import signal
import threading

from pipeline.distributed import World


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a resume point was written."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(f"{signal_name}: {message}")
        self.exit_code = 128 + signal.Signals[signal_name].value  # as if the signal killed it


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a request that the loop honours between steps, so the
    resume point it then writes is consistent (never a half-applied optimizer step). A
    second signal acts at once, as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals need it
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed(world: World, stop: str | None, save: bool) -> tuple[str | None, bool]:
    """The signal any rank got (SIGINT over SIGTERM; None: none), and whether any rank
    wants a resume point: every rank then saves and stops alike. A collective."""
    if not world.distributed:
        return stop, save
    sigint, sigterm, save = world.any(stop == "SIGINT", stop == "SIGTERM", save)
    return ("SIGINT" if sigint else "SIGTERM" if sigterm else None), save
