"""Training and evaluation throughput of every architecture, against the machine's peak.

    python benchmarks/throughput.py [--presets quick small medium] [--steps 30]

For each preset and model: training tokens/s through the train stage's own step
(`pipeline.steps.train_step`, with the preset's optimizer, loss and clip) on
random token ids over a PTB-sized vocabulary (throughput does not depend on the
text), after 3 warm-up steps, the median of groups of 5 steps; exact-evaluation
tokens/s through the one scorer (`score_stream`), the fastest of 3 passes; peak
memory (resident set size of a fresh process per model on CPU,
`torch.cuda.max_memory_allocated` on GPU); and the achieved fraction of the
matrix-product peak measured in the same run (a large fp32 and bf16 matmul).
Where bf16 products have hardware support (CUDA, or a CPU with AVX-512 BF16 or AMX),
every model is measured twice: fp32, and training under bf16 autocast (`train.cuda_precision` on
CUDA, `train.cpu_precision` on a CPU); evaluation is fp32 in both rows, as in the pipeline.
Useful FLOPs per training token are counted as 6 x the parameters that take part
in matrix products (2 forward, 4 backward; embedding lookups excluded).
Each process reuses freed memory as the train stage does (pipeline/hostmemory.py).
Writes a Markdown table to benchmarks/results/throughput-<device>.md (--results: elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import write_text
from pipeline.errors import run_stage
from pipeline.hostmemory import reuse_freed_memory
from pipeline.networks import KINDS, LanguageModel
from pipeline.neural import pick_device
from pipeline.params import load_section
from pipeline.perplexity import cpu_model, score_stream
from pipeline.precision import LABELS, bf16_products, products
from pipeline.presets import TrainParams
from pipeline.steps import make_optimizer, make_step

# A row's training figure is the median of groups of GROUP steps, its evaluation figure
# the fastest of EVAL_PASSES passes: a moment of load on a shared machine does not move it
GROUP = 5
EVAL_PASSES = 3
RESULTS = Path(__file__).parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of repeated (size x size) @ (size x size) products."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    sync(device)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
        if device.startswith("cuda") and done % 10:
            continue
        sync(device)
    sync(device)
    return 2 * size**3 * done / (time.perf_counter() - started) / 1e9


def peak_memory_mib(device: str) -> float:
    """The GPU's max allocated memory since the last reset, else this process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def device_name(device: str) -> str:
    """The GPU's or the CPU's model name, for the results' header."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model()


def matmul_parameters(model: LanguageModel) -> int:
    """Parameters used in matrix products: all but the input embedding (unless it is
    also the tied output projection)."""
    net = model.net
    tied = net.out.weight is net.embed.weight
    return model.num_parameters() - (0 if tied else net.embed.weight.numel())


def setup(preset: str, model_name: str, vocab: int, device: str, precision: str = "fp32",
          graphs: bool = False):
    """(train params, model, the train stage's step callable, training config, a (B, T+1)
    batch of random ids) for PTB's resolved settings of `model_name` under `preset`."""
    params = dataclasses.replace(load_section("train", TrainParams), preset=preset)
    spec = params.spec("ptb", model_name)
    torch.manual_seed(0)
    model = LanguageModel(spec.for_vocabulary(vocab)).to(device)
    cfg = spec.training
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.bptt + 1), device=device)
    graphs = graphs and device.startswith("cuda")  # as in the train stage
    opt = make_optimizer(model, cfg, graphed=graphs)
    step = make_step(model, opt, cfg=cfg, precision=precision, graphs=graphs)
    return params, model, step, cfg, x


def run_steps(step, x: torch.Tensor, state, steps: int, precision: str):
    """`steps` calls of the train stage's own step on the (B, T+1) ids `x`; the state."""
    with products(precision):
        for _ in range(steps):
            state = step(x[:, :-1], x[:, 1:], state).state
    return state


def profile_step(preset: str, model_name: str, vocab: int, device: str, precision: str,
                 graphs: bool = False, steps: int = 10,
                 top: int = 8) -> list[tuple[str, float]]:
    """Where the training step's time goes: the `top` operators by self time
    (torch.profiler), as (name, share of the profiled time)."""
    from torch.profiler import ProfilerActivity, profile

    _, model, step, cfg, x = setup(preset, model_name, vocab, device, precision, graphs)
    state = run_steps(step, x, None, 5, precision)  # warm-up (and a graph's capture)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        run_steps(step, x, state, steps, precision)
        sync(device)
    ops = prof.key_averages()
    attr = "self_cpu_time_total"
    if device.startswith("cuda"):  # torch before 2.4 names it self_cuda_time_total
        attr = "self_device_time_total" if hasattr(ops[0], "self_device_time_total") \
            else "self_cuda_time_total"
    total = sum(getattr(op, attr) for op in ops)
    ranked = sorted(ops, key=lambda op: getattr(op, attr), reverse=True)[:top]
    return [(op.key, getattr(op, attr) / total) for op in ranked]


def train_tokens_per_s(step, cfg, x: torch.Tensor, steps: int, device: str,
                       precision: str) -> float:
    """Training tokens/s of the train stage's own step on the (B, T+1) ids `x`: the median
    of groups of GROUP steps (at least one group), after 5 warm-up steps (a CUDA graph's
    warm-up and capture among them)."""
    state = run_steps(step, x, None, 5, precision)  # warm-up
    group_seconds = []
    for _ in range(max(steps // GROUP, 1)):
        sync(device)
        started = time.perf_counter()
        state = run_steps(step, x, state, GROUP, precision)
        sync(device)
        group_seconds.append(time.perf_counter() - started)
    return GROUP * cfg.batch_size * cfg.bptt / statistics.median(group_seconds)


def eval_tokens_per_s(model, ids: np.ndarray, chunk: int, device: str) -> float:
    """Exact-evaluation tokens/s of the one scorer over `ids`: the fastest of EVAL_PASSES."""
    pass_seconds = []
    for _ in range(EVAL_PASSES):
        started = time.perf_counter()
        score_stream(model, ids, chunk, 0, device)
        sync(device)
        pass_seconds.append(time.perf_counter() - started)
    return len(ids) / min(pass_seconds)


def measure(preset: str, model_name: str, vocab: int, steps: int, eval_tokens: int,
            device: str, precision: str, graphs: bool = False) -> dict:
    """One model's figures (run in a fresh process on CPU, for its own peak RSS)."""
    params, model, step, cfg, x = setup(preset, model_name, vocab, device, precision, graphs)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train_tps = train_tokens_per_s(step, cfg, x, steps, device, precision)
    ids = np.random.default_rng(0).integers(0, vocab, size=eval_tokens)
    eval_tps = eval_tokens_per_s(model, ids, params.eval_chunk, device)
    memory = peak_memory_mib(device)
    return {"preset": preset, "model": model_name, "parameters": model.num_parameters(),
            "precision": LABELS[precision] + (", cuda graph" if graphs else ""),
            "peak_key": "bf16" if precision == "bf16" else "fp32",
            "batch": f"{cfg.batch_size}x{cfg.bptt}", "train_tok_s": train_tps,
            "eval_tok_s": eval_tps, "gflop_s": 6 * matmul_parameters(model) * train_tps / 1e9,
            "peak_mib": memory}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["quick", "small"])
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=30,
                        help=f"timed training steps per row, in groups of {GROUP}")
    parser.add_argument("--eval-tokens", type=int, default=10_000)
    parser.add_argument("--profile", default="lstm2", metavar="MODEL",
                        help="profile this model's training step under the first preset "
                        "('' = none)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the table goes")
    args = parser.parse_args(argv)
    params = load_section("train", TrainParams)
    unknown = [p for p in args.presets if p not in params.presets]
    if unknown:
        parser.error(f"--presets: unknown preset {unknown[0]!r}; defined: "
                     f"{', '.join(params.presets)}")
    if args.profile and args.profile not in KINDS:
        parser.error(f"--profile: unknown model {args.profile!r}; known: {', '.join(KINDS)}")
    for name in ("vocab", "steps", "eval_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be positive, got "
                         f"{getattr(args, name)}")
    device = pick_device(params.device)
    reuse_freed_memory()  # as the train stage's process does (so do the workers below)
    name = device_name(device)
    peak = {"fp32": matmul_peak(device, torch.float32),
            "bf16": matmul_peak(device, torch.bfloat16) if bf16_products(device) else 0.0}
    precisions = ("fp32", "tf32", "bf16") if device.startswith("cuda") else \
        ("fp32", "bf16") if peak["bf16"] else ("fp32",)
    graphs = params.cuda_graphs and device.startswith("cuda")  # the train stage's step
    jobs = [(p, m, args.vocab, args.steps, args.eval_tokens, device, precision, graphs)
            for p in args.presets for m in params.models for precision in precisions]
    if device == "cpu":  # a fresh process per model: its own peak resident memory
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                 max_tasks_per_child=1, initializer=reuse_freed_memory) as pool:
            rows = list(pool.map(measure, *zip(*jobs, strict=True)))
    else:
        rows = [measure(*job) for job in jobs]
    lines = [f"Throughput on {device} ({name}, {torch.get_num_threads()} threads), torch "
             f"{torch.__version__}, vocabulary {args.vocab:,}; matrix-product peak "
             f"{peak['fp32']:,.0f} GFLOP/s fp32, " + (
                 f"{peak['bf16']:,.0f} GFLOP/s bf16" if peak["bf16"] else
                 "no fast bf16 (CPU capability "
                 f"{torch.backends.cpu.get_cpu_capability()}: no AVX-512 BF16 or AMX)"), "",
             "| preset | model | training precision | parameters | batch x bptt "
             "| train tokens/s | eval tokens/s | train GFLOP/s | of that precision's peak "
             "| peak memory (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['model']} | {r['precision']} | {r['parameters']:,} "
              f"| {r['batch']} "
              f"| {r['train_tok_s']:,.0f} | {r['eval_tok_s']:,.0f} | {r['gflop_s']:,.1f} "
              f"| {r['gflop_s'] / peak[r['peak_key']]:.0%} "
              f"| {r['peak_mib']:,.0f} |" for r in rows]
    results = args.results / f"throughput-{device}.md"
    write_text(results, "\n".join(lines) + "\n")  # the table, before the profile
    if args.profile:
        for precision in precisions:
            shares = profile_step(args.presets[0], args.profile, args.vocab, device, precision,
                                  graphs)
            lines += ["", f"Where the {args.presets[0]} {args.profile} training step spends "
                      f"its time, {LABELS[precision]} (torch.profiler, self "
                      "time of the top operators):", "", "| operator | share |", "|---|---|"]
            lines += [f"| `{name}` | {share:.0%} |" for name, share in shares]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(results, text)


if __name__ == "__main__":
    run_stage(main)
