"""Quality and speed of bf16 training against fp32: one model, trained twice by the train
stage's own function, under the committed preset.

    python -m benchmarks.precision [--corpus ptb] [--model lstm2] [--data data/prepared/ptb]

Both runs train the same steps on the same data from the same seed; only the training
steps' precision differs (`train.cpu_bf16` on a CPU, `train.bf16` on CUDA); both are
scored in fp32 by the one scorer. The check the precision setting must pass: valid
perplexity within 1% of fp32's (issue 10). Needs the corpus prepared
(`dvc repro prepare@ptb`). Writes benchmarks/results/precision-<device>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.throughput import device_name
from pipeline.atomic import write_text
from pipeline.hostmemory import reuse_freed_memory
from pipeline.params import load_section
from pipeline.presets import TrainParams
from pipeline.train import bf16_products, pick_device, train_and_score

TOLERANCE = 0.01  # bf16's valid perplexity within 1% of fp32's


def train_once(corpus: str, model: str, data: Path, params: TrainParams, folder: Path) -> dict:
    started = time.perf_counter()
    metrics = train_and_score(corpus, model, data, folder / "ckpt", folder / "model.pt",
                              folder / "curve.json", params)
    return metrics | {"wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="ptb")
    parser.add_argument("--model", default="lstm2")
    parser.add_argument("--data", type=Path, default=Path("data/prepared/ptb"))
    args = parser.parse_args()
    params = load_section("train", TrainParams)
    device = pick_device(params.device)
    reuse_freed_memory()  # as the train stage's process does
    if not bf16_products(device):
        raise SystemExit(f"{device}: no hardware bf16 matrix products here; nothing to compare")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lmb-precision-") as tmp:
        for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
            chosen = dataclasses.replace(params, bf16=bf16, cpu_bf16=bf16, checkpoint_every_s=0)
            runs[name] = train_once(args.corpus, args.model, args.data, chosen,
                                    Path(tmp) / name.split()[0])
    fp32, bf16 = runs["fp32"], runs["bf16 autocast"]
    change = bf16["valid_ppl"] / fp32["valid_ppl"] - 1
    name = device_name(device)
    lines = [f"bf16 against fp32 training on {device} ({name}, {torch.get_num_threads()} "
             f"threads, CPU capability {torch.backends.cpu.get_cpu_capability()}), torch "
             f"{torch.__version__}: {args.corpus} {args.model}, {params.preset} preset, "
             f"{fp32['train_tokens']:,} training tokens ({fp32['epochs']:g} epochs); "
             "scored in fp32", "",
             "| training precision | valid ppl | test ppl | train tokens/s | stage wall (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | {r['tokens_per_s']:,.0f} "
              f"| {r['wall_s']:,.0f} |" for k, r in runs.items()]
    lines += ["", f"valid perplexity, bf16 against fp32: {change:+.2%} (allowed: within "
              f"{TOLERANCE:.0%}): {'pass' if abs(change) <= TOLERANCE else 'FAIL'}; training "
              f"speed x{bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(Path(__file__).parent / "results" / f"precision-{device}.md", text)


if __name__ == "__main__":
    main()
