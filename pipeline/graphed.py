"""The training step captured once as a CUDA graph and replayed (CUDA only).

At batch 20 a recurrent model's step on a GPU is bound by launching its few hundred
small kernels from Python, not by arithmetic. A CUDA graph records every kernel of
one whole step (forward, backward, gradient clipping, optimizer update, carrying the
state) once and replays them with one launch:

    step 1..3   eager train_step, on a side stream (lazy cuDNN/cuBLAS set-up and the
                optimizer's state happen outside the capture)
    step 4      capture: the same train_step, recorded with static tensors
                  x, y (B, T) ids   state_in   -> loss, grad norm, state_in <- new state
                then replay it: this step's update
    step 5..    copy the chunk into x, y; replay
    short last chunk of an epoch (T' < T): the eager train_step

The replayed step is train_step itself: the same arithmetic, so the same numbers as
the eager loop up to floating-point kernel choice (tests/test_graphed.py, on a GPU).
What a graph needs from the rest: a learning rate held in a device tensor (updated in
place; make_optimizer(graphed=True)), dropout drawing from the CUDA generator's
graph-safe Philox state (torch's dropout, and cuDNN's own between LSTM layers), no
host synchronisation inside the step.
"""

from __future__ import annotations

import torch

from pipeline.networks import LanguageModel, detach

WARMUP = 3  # eager steps before the capture (the PyTorch recipe's side-stream warm-up)


def _copy_state(into, source) -> None:
    """Copy a recurrent state (a tensor or a tuple of them) into static buffers."""
    if isinstance(into, tuple):
        for buffer, value in zip(into, source, strict=True):
            buffer.copy_(value)
    else:
        into.copy_(source)


def _zeros_like(state):
    if isinstance(state, tuple):
        return tuple(torch.zeros_like(s) for s in state)
    return torch.zeros_like(state)


def _first(state) -> torch.Tensor:
    return state[0] if isinstance(state, tuple) else state


class GraphedStep:
    """A drop-in for `train_step(model, opt, x, y, state, cfg=..., autocast=...)` that
    replays one captured CUDA graph for every full (B, T) chunk."""

    def __init__(self, model: LanguageModel, opt: torch.optim.Optimizer, *, cfg,
                 autocast: bool, step):
        self.model, self.opt, self.cfg, self.autocast = model, opt, cfg, autocast
        self._step = step  # pipeline.steps.train_step (passed in: no import cycle)
        self.warm = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x = self.y = self.state_in = self.loss = self.norm = None

    def eager(self, xb: torch.Tensor, yb: torch.Tensor, state):
        return self._step(self.model, self.opt, xb, yb, state, cfg=self.cfg,
                          autocast=self.autocast)

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor, state):
        if xb.size(1) != self.cfg.bptt:  # an epoch's short last chunk
            return self.eager(xb, yb, state)
        if self.warm < WARMUP:
            self.warm += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = self.eager(xb, yb, state)
            torch.cuda.current_stream().wait_stream(side)
            self.template = detach(result.state)  # the state's shapes, for the capture
            return result
        if self.graph is None:
            self._capture(xb, yb)
        self.x.copy_(xb)  # (B, T)
        self.y.copy_(yb)  # (B, T)
        if state is None:  # an epoch starts each column afresh: zeros, as PyTorch's None
            _zeros_state(self.state_in)
        elif _first(state) is not _first(self.state_in):  # a state from elsewhere (resume)
            _copy_state(self.state_in, state)
        self.graph.replay()
        # the graph rewrites loss and norm at every replay: the loop keeps copies
        return self._result(self.loss.clone(), self.norm.clone(), self.state_in)

    def _capture(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Record one step on static buffers (capture runs nothing: the replay does)."""
        self.x, self.y = xb.clone(), yb.clone()  # (B, T) each
        self.state_in = _zeros_like(self.template)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a checkpoint written on another thread meanwhile is no concern
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            result = self.eager(self.x, self.y, self.state_in)
            _copy_state(self.state_in, result.state)  # the next step's input state
        self.loss, self.norm, self._result = result.loss, result.grad_norm, type(result)


def _zeros_state(state) -> None:
    if isinstance(state, tuple):
        for s in state:
            s.zero_()
    else:
        state.zero_()
