"""The neural language models, behind one interface.

    logits, loss, state = model(idx, targets=None, state=None)
        idx, targets: (B, T) token ids; logits: (B, T, V); loss: mean NLL in nats
        state: what the model carries from one chunk of the stream to the next

Every model reads a split as one stream, so one training loop and one scorer
serve all of them without branching on the type:

- `window` (Bengio et al. 2003): the n-1 previous tokens through a shared
  embedding (m), concatenated, a tanh hidden layer (h), softmax over the
  vocabulary, optionally with direct embedding-to-output connections. Its
  "state" is simply the last n-1 tokens of the previous chunk, so chunk borders
  lose no context.
- `rnn`: Elman RNN (tanh), one layer. `gru`: GRU (Cho et al. 2014), one layer.
  `lstm`: one layer. `lstm2`: two layers. Their state is the recurrent hidden
  state, detached between chunks by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Kind = Literal["window", "rnn", "gru", "lstm", "lstm2"]
KINDS: tuple[str, ...] = ("window", "rnn", "gru", "lstm", "lstm2")
CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM, "lstm2": nn.LSTM}


@dataclass(frozen=True)
class NetworkConfig:
    kind: Kind
    vocab_size: int
    embedding_size: int  # m
    hidden_size: int  # h
    context: int  # window: the n-1 previous tokens it reads; ignored by recurrent models
    dropout: float  # on non-recurrent connections
    tie_weights: bool  # output projection shares the input embedding
    direct_connections: bool  # window: embeddings also feed the output layer
    init_range: float  # uniform init in [-r, r]; 0 keeps PyTorch's defaults
    # LSTMs: the forget gates' bias after init (Gers et al. 2000; Jozefowicz et al. 2015),
    # so that a cell starts out keeping its memory; 0 leaves the init above untouched
    # (the default is for checkpoints written before this setting existed)
    forget_bias: float = 0.0

    def check(self) -> list[tuple[str, str]]:
        """(key, problem) pairs; empty when the configuration is buildable."""
        problems = []
        if self.kind not in KINDS:
            problems.append(("model", f"unknown model {self.kind!r}; known: {', '.join(KINDS)}"))
        for key in ("vocab_size", "embedding_size", "hidden_size"):
            if getattr(self, key) <= 0:
                problems.append((key, f"must be positive, got {getattr(self, key)}"))
        if self.kind == "window" and self.context < 1:
            problems.append(("context", f"must be >= 1, got {self.context}"))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if not math.isfinite(self.forget_bias):
            problems.append(("forget_bias", f"must be finite, got {self.forget_bias}"))
        if self.init_range < 0:
            problems.append(("init_range", f"must be >= 0, got {self.init_range}"))
        if self.tie_weights and self.embedding_size != self.hidden_size:
            problems.append(("tie_weights", "needs embedding_size == hidden_size, got "
                             f"{self.embedding_size} and {self.hidden_size}"))
        return problems


class WindowLM(nn.Module):
    """Bengio et al. (2003): y = b + W x + U tanh(d + H x), x = the n-1 embeddings."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        n_in = cfg.context * cfg.embedding_size
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embedding_size)
        self.hidden = nn.Linear(n_in, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.direct = nn.Linear(n_in, cfg.vocab_size, bias=False) if cfg.direct_connections \
            else None
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.tie_weights:
            self.out.weight = self.embed.weight

    def initial_state(self, batch: int, device: torch.device) -> torch.Tensor:
        # the stream starts as if after a run of <eos> (id 0): "start of text"
        return torch.zeros(batch, self.cfg.context, dtype=torch.long, device=device)

    def step(self, idx: torch.Tensor, state: torch.Tensor):
        C, T = self.cfg.context, idx.size(1)
        full = torch.cat([state, idx], dim=1)  # (B, C + T): the C tokens before, then idx
        # position t predicts the token after idx[t] from the C tokens ending at idx[t]:
        # full[t+1 : t+C+1], i.e. windows 1..T of all length-C windows
        windows = full.unfold(1, C, 1)[:, 1 : T + 1]  # (B, T, C)
        x = self.drop(self.embed(windows).flatten(2))  # (B, T, C*m)
        logits = self.out(self.drop(torch.tanh(self.hidden(x))))  # (B, T, V)
        if self.direct is not None:
            logits = logits + self.direct(x)
        return logits, full[:, -C:]  # the next chunk's context

    def read(self, idx: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return torch.cat([state, idx], dim=1)[:, -self.cfg.context:]  # (B, C)


class RecurrentLM(nn.Module):
    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        layers = 2 if cfg.kind == "lstm2" else 1
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embedding_size)
        cell = CELLS[cfg.kind]
        extra = {"nonlinearity": "tanh"} if cfg.kind == "rnn" else {}
        self.rnn = cell(cfg.embedding_size, cfg.hidden_size, num_layers=layers,
                        dropout=cfg.dropout if layers > 1 else 0.0, batch_first=True, **extra)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_weights:
            self.out.weight = self.embed.weight

    def initial_state(self, batch: int, device: torch.device):
        return None  # zeros, created by PyTorch

    def step(self, idx: torch.Tensor, state):
        x = self.drop(self.embed(idx))  # (B, T, m)
        y, state = self.rnn(x, state)  # (B, T, h)
        return self.out(self.drop(y)), state  # (B, T, V)

    def read(self, idx: torch.Tensor, state):
        _, state = self.rnn(self.drop(self.embed(idx)), state)  # no output layer
        return state

    def set_forget_bias(self, value: float) -> None:
        """Every LSTM layer's forget-gate bias to `value`. PyTorch orders an LSTM's gates
        (input, forget, cell, output) and adds two bias vectors: b_ih carries the value,
        b_hh is zeroed in the forget slice."""
        H = self.cfg.hidden_size
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    p[H : 2 * H].fill_(value)
                elif name.startswith("bias_hh"):
                    p[H : 2 * H].zero_()


class LanguageModel(nn.Module):
    """The one interface the training loop and the scorer use."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        problems = cfg.check()
        if problems:
            key, problem = problems[0]
            raise ValueError(f"{key}: {problem}")
        self.cfg = cfg
        self.net = WindowLM(cfg) if cfg.kind == "window" else RecurrentLM(cfg)
        if cfg.init_range > 0:
            for p in self.parameters():
                nn.init.uniform_(p, -cfg.init_range, cfg.init_range)
        if cfg.forget_bias and cfg.kind in ("lstm", "lstm2"):
            self.net.set_forget_bias(cfg.forget_bias)

    def initial_state(self, batch: int, device: torch.device):
        return self.net.initial_state(batch, device)

    def read(self, idx: torch.Tensor, state=None):
        """The state after reading idx (B, T), without predicting: no output layer, so
        much cheaper than forward() over a large vocabulary (the analyses use it)."""
        if state is None:
            state = self.initial_state(idx.size(0), idx.device)
        return self.net.read(idx, state)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, state=None):
        if state is None:
            state = self.initial_state(idx.size(0), idx.device)
        logits, state = self.net.step(idx, state)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss, state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach(state):
    """Cut the graph between chunks (truncated back-propagation through time)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()
