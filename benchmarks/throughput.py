"""Training and evaluation throughput of every architecture on this machine.

    python benchmarks/throughput.py [--preset quick] [--vocab 10000] [--steps 20]

Each model of the preset (params.yaml) trains for a fixed number of steps on
random token ids over a PTB-sized vocabulary (throughput does not depend on the
text), after a few warm-up steps; evaluation runs the exact stream scorer over
a fixed number of tokens. Prints a Markdown table and writes it to
benchmarks/results/throughput-<device>-<preset>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import write_text
from pipeline.networks import LanguageModel
from pipeline.params import load_section
from pipeline.perplexity import score_stream
from pipeline.presets import TrainParams
from pipeline.train import pick_device
from pipeline.training import make_optimizer, train_step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model_name: str, params: TrainParams, vocab: int, steps: int, eval_tokens: int,
            device: str) -> dict:
    spec = params.spec("ptb", model_name)
    cfg = spec.training
    torch.manual_seed(0)
    model = LanguageModel(spec.for_vocabulary(vocab)).to(device)
    opt = make_optimizer(model, cfg)
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.bptt + 1), device=device)
    autocast = params.bf16 and device.startswith("cuda")
    state = None
    for step in range(3 + steps):  # the train stage's own step, after 3 warm-up steps
        if step == 3:
            sync(device)
            started = time.perf_counter()
        _, state = train_step(model, opt, x[:, :-1], x[:, 1:], state, cfg=cfg,
                              autocast=autocast)
    sync(device)
    train_tps = steps * cfg.batch_size * cfg.bptt / (time.perf_counter() - started)
    ids = np.random.default_rng(0).integers(0, vocab, size=eval_tokens)
    started = time.perf_counter()
    score_stream(model, ids, params.eval_chunk, 0, device)
    sync(device)
    eval_tps = eval_tokens / (time.perf_counter() - started)
    return {"model": model_name, "parameters": model.num_parameters(),
            "batch": f"{cfg.batch_size}x{cfg.bptt}", "train_tok_s": train_tps,
            "eval_tok_s": eval_tps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="default: train.preset in params.yaml")
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-tokens", type=int, default=20_000)
    args = parser.parse_args()
    params = load_section("train", TrainParams)
    if args.preset:
        params = dataclasses.replace(params, preset=args.preset)
        params.validate("train")
    device = pick_device(params.device)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    rows = [measure(m, params, args.vocab, args.steps, args.eval_tokens, device)
            for m in params.models]
    lines = [f"Throughput, preset `{params.preset}`, vocabulary {args.vocab:,}, device "
             f"{device} ({name}, {torch.get_num_threads()} threads), torch {torch.__version__}",
             "", "| model | parameters | batch x bptt | train tokens/s | eval tokens/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['batch']} | {r['train_tok_s']:,.0f} "
              f"| {r['eval_tok_s']:,.0f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(Path(__file__).parent / "results" / f"throughput-{device}-{params.preset}.md", text)


if __name__ == "__main__":
    main()
