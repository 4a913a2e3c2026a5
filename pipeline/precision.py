"""The arithmetic a training step runs in, per device; scoring is always plain fp32.

    fp32   float32 products everywhere (cuBLAS and cuDNN without TF32)
    tf32   float32 tensors, matrix products on TF32 tensor cores (CUDA only)
    bf16   bfloat16 autocast: matrix products in bf16, losses and weights in fp32

On CUDA each model has its own setting (`train.cuda_precision.<model>`), chosen by
measurement (`choose`: the fastest whose validation perplexity is at most 1% above fp32's;
benchmarks/gpu.py measures it). On a CPU one setting serves every model,
`train.cpu_precision`: `auto` trains in bf16 where the CPU has bf16 matrix units
(AVX-512 BF16 or AMX) and in fp32 elsewhere, `bf16` is refused where bf16 products would
be emulated, `fp32` is fp32 everywhere. Every metrics row records the precision it
trained with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from pipeline.errors import UserError

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
LABELS = {"fp32": "fp32", "tf32": "tf32 matrix products", "bf16": "bf16 autocast"}
TOLERANCE = 0.01  # a cheaper precision may cost at most 1% of fp32's valid perplexity


class PrecisionError(UserError, ValueError):
    pass


def bf16_products(device: str) -> bool:
    """Whether bf16 matrix products have hardware support on `device` (a CPU without
    AVX-512 BF16 or AMX emulates them, hundreds of times slower than fp32)."""
    if device == "cpu":  # (oneDNN's own check also accepts AVX-512 CPUs without BF16)
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


def training_precision(device: str, *, cuda: str, cpu: str) -> str:
    """The precision training steps run in on `device`: `cuda` (the model's
    train.cuda_precision) on a GPU; on a CPU `cpu` (train.cpu_precision), where `auto`
    means bf16 if the CPU has bf16 matrix units and fp32 if not, and `bf16` is refused
    without them (emulated: far slower than fp32, for no gain)."""
    if device.startswith("cuda"):
        return cuda
    if device != "cpu" or cpu == "fp32":
        return "fp32"
    if cpu == "auto":
        return "bf16" if bf16_products(device) else "fp32"
    if not bf16_products(device):
        raise PrecisionError(f"train.cpu_precision: this CPU "
                             f"({torch.backends.cpu.get_cpu_capability()}) has no bf16 matrix "
                             "units (AVX-512 BF16 or AMX), so bf16 would be emulated and far "
                             "slower than fp32; set it to auto or fp32")
    return "bf16"


@contextlib.contextmanager
def products(precision: str) -> Iterator[None]:
    """Run the block's CUDA matrix products (cuBLAS and cuDNN) with TF32 allowed exactly
    when `precision` is tf32, then restore the flags. (cuDNN allows TF32 by default: plain
    fp32 has to switch it off.) No effect on a CPU."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [flag.allow_tf32 for flag in flags]
    for flag in flags:
        flag.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        for flag, value in zip(flags, before, strict=True):
            flag.allow_tf32 = value


def acceptable(valid_ppl: float, fp32_ppl: float, tolerance: float = TOLERANCE) -> bool:
    """Whether a cheaper precision's validation perplexity costs at most `tolerance`
    (relative) against fp32's. Lower is no loss: two trainings that differ only in rounding
    drift apart like two seeds, either way (README, Throughput)."""
    return valid_ppl <= fp32_ppl * (1 + tolerance)


def choose(valid_ppl: dict[str, float], tokens_per_s: dict[str, float],
           tolerance: float = TOLERANCE) -> str:
    """The fastest precision whose validation perplexity is `acceptable` against fp32's;
    fp32 when nothing faster qualifies. Both mappings are keyed by precision and must
    hold fp32."""
    if "fp32" not in valid_ppl or "fp32" not in tokens_per_s:
        raise ValueError("the choice needs the fp32 measurement to compare with")
    fit = [p for p in valid_ppl if p in tokens_per_s
           and acceptable(valid_ppl[p], valid_ppl["fp32"], tolerance)]
    return max(fit, key=lambda p: (tokens_per_s[p], p == "fp32"))
