"""The perplexity contract, in one place.

Perplexity = exp(total negative log-likelihood / total predicted tokens), over a
whole split in order; every <eos> is predicted and counted. Every model's score
goes through `SplitScore`, so the n-gram and neural rows are computed alike and
every metrics file records the token count behind its number.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

LN10 = math.log(10.0)


@dataclass(frozen=True)
class SplitScore:
    nll: float  # total negative log-likelihood of the split, in nats
    tokens: int  # predicted tokens, <eos> included

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ValueError(f"a split score needs at least one token, got {self.tokens}")
        if not math.isfinite(self.nll):
            raise ValueError(f"non-finite total negative log-likelihood {self.nll}")

    @classmethod
    def from_log10(cls, total_log10_prob: float, tokens: int) -> SplitScore:
        """From a sum of log10 probabilities (KenLM's unit)."""
        return cls(nll=-total_log10_prob * LN10, tokens=tokens)

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / math.log(2.0)

    def metrics(self, split: str, level: str) -> dict[str, float | int]:
        """Flat metric keys for metrics files, MLflow and the leaderboard."""
        out: dict[str, float | int] = {
            f"{split}_ppl": round(self.perplexity, 4),
            f"{split}_nll_nats": round(self.nll, 4),
            f"{split}_tokens": self.tokens,
        }
        if level == "char":
            # every token of a character corpus is one character (<eos> is the newline)
            out[f"{split}_bpc"] = round(self.bits_per_token, 5)
        return out


def scoring_setup(chunk: int, device: str) -> dict:
    """What the last digits of a neural score depend on besides the weights and the split:
    this scorer's code, the chunk, the device and its kernels, torch, the thread count.
    The same weights scored under the same setup give the same number, bit for bit."""
    import torch

    kernels = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
    return {"scorer": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
            "chunk": chunk, "device": device, "kernels": kernels, "torch": str(torch.__version__),
            "threads": torch.get_num_threads()}


def cpu_model() -> str:
    """The CPU's model name (Linux), else what Python knows of it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        import platform

        return platform.processor() or "cpu"
    return next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "cpu")


def score_stream(model, ids, chunk: int, eos_id: int, device: str = "cpu") -> SplitScore:
    """Exact perplexity of a neural model over a whole split, read as one stream."""
    nll, tokens = stream_nll(model, ids, chunk, eos_id, device)
    return SplitScore(nll=nll, tokens=tokens)


def stream_nll(model, ids, chunk: int, eos_id: int, device: str = "cpu") -> tuple[float, int]:
    """(total NLL in nats, tokens) of a split read as one stream, possibly non-finite
    (see stream_token_nll)."""
    nll = stream_token_nll(model, ids, chunk, eos_id, device)
    return float(nll.sum()), len(nll)


def stream_token_nll(model, ids, chunk: int, eos_id: int, device: str = "cpu"):
    """The NLL of every token (nats, float64 array of len(ids)) of a split read as one
    stream, possibly non-finite.

    The split is scored in order, in chunks of `chunk` tokens with the model's state
    carried from chunk to chunk, so the result does not depend on `chunk` (only on
    floating-point rounding). The first token is predicted after an <eos>, as if the
    split followed the end of a previous line: every token of the split is predicted
    once, the same count as the n-gram stage's. (Evaluation always runs one stream:
    splitting it into batch columns would restart the state at every column and make
    the number depend on the batch size.)

        targets:  w1  w2  w3 ... wN
        inputs:   eos w1  w2 ... wN-1        (shifted by one)
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipeline.precision import products

    targets = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    inputs = torch.cat([torch.tensor([eos_id]), targets[:-1]])
    was_training = model.training
    model.eval()
    nll = []
    state = None
    with torch.no_grad(), products("fp32"):  # plain fp32 on a GPU too (no TF32)
        for start in range(0, len(targets), chunk):
            x = inputs[start : start + chunk].to(device)[None]  # (1, T)
            y = targets[start : start + chunk].to(device)[None]  # (1, T)
            logits, _, state = model(x, state=state)  # (1, T, V)
            # log-softmax in float32 (in float64 it took as long as the forward pass),
            # the per-token losses kept (and summed) in float64
            nll.append(F.cross_entropy(logits[0].float(), y[0], reduction="none").double())
    model.train(was_training)
    return torch.cat(nll).cpu().numpy()  # (N,)
