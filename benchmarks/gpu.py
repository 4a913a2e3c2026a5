"""The GPU checklist (medium preset, throughput, bf16 parity, determinism) in one command,
for a GPU machine that has torch, numpy, yaml and tqdm but no DVC, MLflow or KenLM.
Prepare PTB first (`dvc repro prepare@ptb`), bring `data/prepared/ptb` (2.4 MB) along and
run there

    python -m benchmarks.gpu --out DIR [throughput] [parity] [determinism] [medium]

The parts, cheap ones first (default: all four, in this order):

  throughput   benchmarks.throughput on the quick and medium presets: training and
               exact-evaluation tokens/s of every model, fp32 and bf16 autocast.
  parity       benchmarks.precision --preset quick --seeds 1 2: PTB quick lstm2, bf16
               against fp32.
  determinism  PTB quick lstm2 (fp32) trained twice from the same seed: the same numbers
               and weights, or by how much they differ.
  medium       PTB lstm2 under the `medium` preset (Zaremba et al. 2014 "medium":
               published valid 86.2, test 82.7), trained and scored by the train stage's
               own `train_and_score`: valid and test perplexity of the best checkpoint,
               training seconds and tokens/s, peak memory (GPU: max allocated). Issue 10's
               target: test <= 84 within 5 minutes of training on one H100.

Each part writes its files to DIR as soon as it ends (medium's learning curve at every
validation point) and appends its verdict, or the one line it failed with, to
DIR/summary.md, after a header naming the device, torch, CUDA and cuDNN; a part that fails
does not stop the others. medium keeps its checkpoints under --work: `... --out DIR
medium`, run again on the same machine, resumes a training cut short by a time limit
(its wall_s then counts the resumed segment only; train_seconds counts all of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
import traceback
from pathlib import Path

import torch

from benchmarks import precision, throughput
from pipeline.atomic import write_json, write_text
from pipeline.errors import run_stage
from pipeline.hostmemory import reuse_freed_memory
from pipeline.params import load_section
from pipeline.presets import TrainParams
from pipeline.references import compare
from pipeline.train import pick_device, train_and_score
from pipeline.training import load_model

PARTS = ("throughput", "parity", "determinism", "medium")  # cheap ones first
TARGET_TEST, TARGET_SECONDS = 84.0, 300.0  # issue 10: test <= 84 within 5 minutes (H100)


def environment(device: str) -> str:
    """One line: where the parts ran."""
    cuda = (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
            if device.startswith("cuda") else f", {torch.get_num_threads()} threads")
    return f"{device} ({throughput.device_name(device)}), torch {torch.__version__}{cuda}"


def append(summary: Path, text: str) -> None:
    """Add a paragraph to summary.md (rewritten whole: never half a line)."""
    before = summary.read_text() if summary.exists() else ""
    write_text(summary, before + text.rstrip() + "\n\n")


def reproduce(params: TrainParams, corpus: str, model: str, data: Path, out: Path,
              work: Path) -> dict:
    """Train and score `model` on `corpus` under params.preset by the train stage's own
    function; its metrics (plus wall seconds, peak memory and the published comparison)
    go to out/<preset>-<corpus>-<model>.json, its learning curve to ...-curve.json."""
    device = pick_device(params.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    name = f"{params.preset}-{corpus}-{model}"
    started = time.perf_counter()
    metrics = train_and_score(corpus, model, data, work / name / "ckpt", work / name / "model.pt",
                              out / f"{name}-curve.json", params)
    comparison = compare(metrics)
    reference = comparison.reference
    metrics |= {"wall_s": round(time.perf_counter() - started, 1),
                "peak_memory_mib": round(throughput.peak_memory_mib(device), 1),
                "published": None if reference is None else
                {"valid": reference.valid, "test": reference.test, "source": reference.source,
                 "same_configuration": comparison.match}}
    write_json(out / f"{name}.json", metrics)
    return metrics


def medium_verdict(metrics: dict) -> str:
    """summary.md's paragraph for the medium part."""
    published = metrics["published"]
    against = "" if published is None else (
        f"; published {published['valid']} / {published['test']} ({published['source']}"
        + ("" if published["same_configuration"] else ", another configuration") + ")")
    met = metrics["test_ppl"] <= TARGET_TEST and metrics["train_seconds"] <= TARGET_SECONDS
    return (f"**{metrics['preset']} {metrics['corpus']} {metrics['model']}**: valid "
            f"{metrics['valid_ppl']:.2f}, test {metrics['test_ppl']:.2f} (best checkpoint, "
            f"epoch {metrics['best_epoch']:g} of {metrics['epochs']:g}){against}. Training "
            f"{metrics['train_seconds']:,.0f} s at {metrics['tokens_per_s']:,.0f} tokens/s "
            f"({metrics['precision']}), {metrics['wall_s']:,.0f} s with scoring; peak memory "
            f"{metrics['peak_memory_mib']:,.0f} MiB. Target test <= {TARGET_TEST:g} within "
            f"{TARGET_SECONDS:.0f} s of training: {'met' if met else 'not met'}.")


def determinism(params: TrainParams, corpus: str, model: str, data: Path, out: Path,
                work: Path) -> str:
    """Train `model` twice from the same seed, from scratch; how far apart the two land."""
    runs, weights = [], []
    for attempt in (1, 2):
        folder = work / f"determinism-{attempt}"
        shutil.rmtree(folder, ignore_errors=True)  # a run found finished would not train
        runs.append(precision.train_once(corpus, model, data, params, folder))
        weights.append(load_model(folder / "model.pt", "cpu").state_dict())
    difference = max((a - b).abs().max().item()
                     for a, b in zip(weights[0].values(), weights[1].values(), strict=True))
    keys = ("valid_ppl", "test_ppl", "best_step")
    same = all(runs[0][k] == runs[1][k] for k in keys) and difference == 0.0
    write_json(out / "determinism.json", {"runs": [{k: r[k] for k in keys} for r in runs],
                                          "max_weight_difference": difference})
    return (f"**determinism** ({params.preset} {corpus} {model}, {runs[0]['precision']}, seed "
            f"{params.spec(corpus, model).training.seed}, twice): "
            + ("the same numbers and weights, bit for bit." if same else
               f"valid {runs[0]['valid_ppl']:.4f} against {runs[1]['valid_ppl']:.4f}, test "
               f"{runs[0]['test_ppl']:.4f} against {runs[1]['test_ppl']:.4f}; the weights "
               f"differ by up to {difference:.3g}."))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"any of {', '.join(PARTS)} (default: all, in this order)")
    parser.add_argument("--out", type=Path, required=True, help="where the results go")
    parser.add_argument("--data", type=Path, default=Path("data/prepared/ptb"))
    parser.add_argument("--work", type=Path, default=Path("models/gpu-checklist"),
                        help="checkpoints (kept: a rerun resumes a training cut short)")
    args = parser.parse_args(argv)
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    args.parts = args.parts or list(PARTS)
    params = load_section("train", TrainParams)
    device = pick_device(params.device)
    reuse_freed_memory()  # as the train stage's process does
    summary = args.out / "summary.md"
    append(summary, f"GPU checklist on {environment(device)}: {', '.join(args.parts)}")
    for part in args.parts:
        started = time.perf_counter()
        try:
            text = run_part(part, params, device, args)
        except (Exception, SystemExit) as exc:  # the next parts still run
            traceback.print_exc()  # on stderr, for whoever debugs it; summary.md gets a line
            said = (str(exc).splitlines() or [""])[0]
            text = f"**{part}**: failed: {type(exc).__name__}: {said}"
        append(summary, f"{text} ({time.perf_counter() - started:,.0f} s)")
        print(text, flush=True)


def run_part(part: str, params: TrainParams, device: str, args: argparse.Namespace) -> str:
    """Run one part of the checklist; its paragraph for summary.md."""
    quick = dataclasses.replace(params, preset="quick")
    if part == "throughput":
        throughput.main(["--presets", "quick", "medium", "--results", str(args.out)])
        return f"**throughput**: {args.out / f'throughput-{device}.md'}"
    if part == "parity":
        precision.main(["--preset", "quick", "--seeds", "1", "2", "--data", str(args.data),
                        "--results", str(args.out)])
        return f"**parity**: {args.out / f'precision-{device}.md'}"
    if part == "determinism":
        fp32 = dataclasses.replace(quick, bf16=False, cpu_bf16=False, checkpoint_every_s=0)
        return determinism(fp32, "ptb", "lstm2", args.data, args.out, args.work)
    medium = dataclasses.replace(params, preset="medium")
    return medium_verdict(reproduce(medium, "ptb", "lstm2", args.data, args.out, args.work))


if __name__ == "__main__":
    run_stage(main)
