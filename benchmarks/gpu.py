"""The GPU checklist in one command, for a GPU machine that has torch, numpy, yaml and tqdm
but no DVC, MLflow or KenLM. Prepare PTB first (`dvc repro prepare@ptb`), bring
`data/prepared/ptb` (2.4 MB) along and run there, inside the machine's time limit:

    timeout -k 20 570 python -m benchmarks.gpu --out DIR [PART ...]

The parts, most valuable first (default: all, in this order):

  graphs       tests/test_graphed.py: the CUDA-graph step gives the eager step's numbers
               (if it fails, every later part trains eagerly: train.cuda_graphs off)
  medium       PTB lstm2 under the `medium` preset (Zaremba et al. 2014 "medium":
               published valid 86.2, test 82.7) by the train stage's own
               `train_and_score`: valid and test perplexity of the best checkpoint, the
               stage's wall time, training tokens/s, peak GPU memory. Target (issue 24):
               test <= 84 with the whole stage within 5 minutes on one H100 or H200.
  peer         lstm2 at the medium sizes: the train stage's step against the step of
               PyTorch's word_language_model example, rewritten here as its main.py does
               it (per-parameter SGD update, loss.item() every batch), same GPU, same run
  precision    each model at the quick preset (one validation per epoch) in fp32, tf32
               and bf16: valid perplexity and training tokens/s, and the precision that
               train.cuda_precision should hold (pipeline.precision.choose)
  scoring      the exact scorer's tokens/s on the valid split at several chunk lengths
               (the medium model's shape), and how far the totals differ
  determinism  PTB quick lstm2 (fp32, one epoch) trained twice from the same seed
  throughput   benchmarks.throughput: every model at the medium and quick sizes, fp32,
               tf32 and bf16 autocast, through the train stage's step

Each part writes its files to DIR as soon as it ends (medium's learning curve at every
validation point) and appends its verdict, or the one line it failed with, to
DIR/summary.md, after a header naming the device, torch, CUDA and cuDNN; a part that
fails does not stop the others. SIGTERM or SIGINT (a `timeout`) stops the whole command:
the part under way writes what it has (medium: its resume point, under --work), the
summary says where it stopped, and no later part starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import throughput
from benchmarks.precision import train_once as train_and_time
from pipeline.atomic import write_json, write_text
from pipeline.checkpoints import load_model
from pipeline.errors import run_stage
from pipeline.hostmemory import reuse_freed_memory
from pipeline.networks import KINDS, LanguageModel
from pipeline.neural import pick_device, train_and_score
from pipeline.params import load_section
from pipeline.perplexity import score_stream
from pipeline.precision import LABELS, PRECISIONS, choose
from pipeline.presets import TrainParams
from pipeline.references import compare
from pipeline.training import TrainingInterrupted

PARTS = ("graphs", "medium", "peer", "precision", "scoring", "determinism", "throughput")
TARGET_TEST, TARGET_SECONDS = 84.0, 300.0  # issue 24: test <= 84, the stage within 5 min
CHUNKS = (512, 2048, 8192, 32768)


class Stopped(BaseException):
    """SIGTERM/SIGINT outside a training (a training writes its resume point first)."""


def _stop(signum, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


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
    met = metrics["test_ppl"] <= TARGET_TEST and metrics["wall_s"] <= TARGET_SECONDS
    return (f"**{metrics['preset']} {metrics['corpus']} {metrics['model']}**: valid "
            f"{metrics['valid_ppl']:.2f}, test {metrics['test_ppl']:.2f} (best checkpoint, "
            f"epoch {metrics['best_epoch']:g} of {metrics['epochs']:g}){against}. Training "
            f"{metrics['train_seconds']:,.0f} s at {metrics['tokens_per_s']:,.0f} tokens/s "
            f"({metrics['precision']}{', ' + metrics['step'] if 'step' in metrics else ''}), "
            f"the whole stage {metrics['wall_s']:,.0f} s; peak memory "
            f"{metrics['peak_memory_mib']:,.0f} MiB. Target test <= {TARGET_TEST:g} with the "
            f"stage within {TARGET_SECONDS:.0f} s: {'met' if met else 'not met'}.")


def train_once(corpus: str, model: str, data: Path, params: TrainParams, folder: Path) -> dict:
    """benchmarks.precision.train_once from scratch: a finished run found would not train."""
    shutil.rmtree(folder, ignore_errors=True)
    return train_and_time(corpus, model, data, params, folder)


def determinism(params: TrainParams, data: Path, out: Path, work: Path) -> str:
    """PTB lstm2 twice from the same seed, from scratch; how far apart the two land."""
    runs = [train_once("ptb", "lstm2", data, params, work / f"determinism-{n}") for n in (1, 2)]
    weights = [load_model(work / f"determinism-{n}" / "model.pt", "cpu").state_dict()
               for n in (1, 2)]
    difference = max((a - b).abs().max().item()
                     for a, b in zip(weights[0].values(), weights[1].values(), strict=True))
    keys = ("valid_ppl", "test_ppl", "best_step")
    same = all(runs[0][k] == runs[1][k] for k in keys) and difference == 0.0
    write_json(out / "determinism.json", {"runs": [{k: r[k] for k in keys} for r in runs],
                                          "max_weight_difference": difference})
    return (f"**determinism** ({params.preset} ptb lstm2, {runs[0]['precision']}, seed "
            f"{params.spec('ptb', 'lstm2').training.seed}, twice): "
            + ("the same numbers and weights, bit for bit." if same else
               f"valid {runs[0]['valid_ppl']:.4f} against {runs[1]['valid_ppl']:.4f}, test "
               f"{runs[0]['test_ppl']:.4f} against {runs[1]['test_ppl']:.4f}; the weights "
               f"differ by up to {difference:.3g}."))


def scoring(params: TrainParams, data: Path, out: Path, work: Path) -> str:
    """The one scorer over PTB's valid split at several chunk lengths, on the medium
    model (its trained weights when the medium part ran, else a fresh medium-sized one)."""
    device = pick_device(params.device)
    trained = work / "medium-ptb-lstm2" / "model.pt"
    ids = np.load(data / "valid.npy", mmap_mode="r")
    if trained.exists():
        model = load_model(trained, device)
    else:
        spec = dataclasses.replace(params, preset="medium").spec("ptb", "lstm2")
        model = LanguageModel(spec.for_vocabulary(int(ids.max()) + 1)).to(device)
    rows = []
    for chunk in CHUNKS:
        score_stream(model, ids[:chunk * 2], chunk, 0, device)  # warm-up of this shape
        throughput.sync(device)
        started = time.perf_counter()
        score = score_stream(model, ids, chunk, 0, device)
        seconds = time.perf_counter() - started
        rows.append({"chunk": chunk, "seconds": seconds, "tokens_per_s": len(ids) / seconds,
                     "nll": score.nll, "ppl": score.perplexity})
    write_json(out / "scoring.json", rows)
    spread = max(r["nll"] for r in rows) - min(r["nll"] for r in rows)
    return ("**scoring** (valid split, " + ("trained" if trained.exists() else "untrained")
            + " medium lstm2): " + ", ".join(f"chunk {r['chunk']}: {r['tokens_per_s']:,.0f} "
                                             f"tokens/s" for r in rows)
            + f"; totals differ by at most {spread:.3g} nats over {len(ids):,} tokens.")


def peer_step(model, x: torch.Tensor, hidden, lr: float, clip: float):
    """One training step as word_language_model's main.py takes it (our own rewrite of
    its loop): detach the hidden state, zero the grads, forward, mean cross-entropy,
    backward, clip, a per-parameter `p.add_(grad, alpha=-lr)`, `loss.item()`."""
    hidden = tuple(h.detach() for h in hidden)
    model.zero_grad()
    _, loss, hidden = model(x[:, :-1], x[:, 1:], hidden)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-lr)
    loss.item()  # the example sums its loss on the host every batch
    return hidden


def peer(params: TrainParams, out: Path) -> str:
    """Training tokens/s of lstm2 at the medium sizes: the train stage's step (graphed
    when train.cuda_graphs, in the model's train.cuda_precision) against the example's."""
    device = pick_device(params.device)
    medium = dataclasses.replace(params, preset="medium")
    precision = medium.cuda_precision["lstm2"]
    _, _, step, cfg, x = throughput.setup("medium", "lstm2", 10_000, device, precision,
                                          medium.cuda_graphs)
    ours = throughput.train_tokens_per_s(step, cfg, x, 100, device, precision)
    _, model, _, _, _ = throughput.setup("medium", "lstm2", 10_000, device)
    hidden_size = model.cfg.hidden_size
    hidden = tuple(torch.zeros(2, cfg.batch_size, hidden_size, device=device)  # 2 layers
                   for _ in range(2))
    lr, clip = cfg.lr * cfg.bptt, cfg.clip / cfg.bptt  # Zaremba's step in the example's units
    for _ in range(5):
        hidden = peer_step(model, x, hidden, lr, clip)
    seconds = []
    for _ in range(20):
        throughput.sync(device)
        started = time.perf_counter()
        for _ in range(throughput.GROUP):
            hidden = peer_step(model, x, hidden, lr, clip)
        throughput.sync(device)
        seconds.append(time.perf_counter() - started)
    theirs = throughput.GROUP * cfg.batch_size * cfg.bptt / statistics.median(seconds)
    step_kind = "cuda graph" if medium.cuda_graphs and device.startswith("cuda") else "eager"
    write_json(out / "peer.json", {"ours_tokens_per_s": ours, "peer_tokens_per_s": theirs,
                                   "ours": f"{LABELS[precision]}, {step_kind}",
                                   "peer": "torch defaults, eager"})
    return (f"**peer** (lstm2, 2 x {hidden_size}, batch {cfg.batch_size} x {cfg.bptt}): the "
            f"train stage's step {ours:,.0f} tokens/s ({LABELS[precision]}, {step_kind}), "
            f"word_language_model's step {theirs:,.0f} tokens/s: x{ours / theirs:.2f}.")


def precision_part(params: TrainParams, data: Path, out: Path, work: Path) -> str:
    """Every model at the quick preset (one validation per epoch) in each precision;
    the choice for train.cuda_precision."""
    quick = dataclasses.replace(params, preset="quick", checkpoint_every_s=0)
    presets = json.loads(json.dumps(quick.presets))
    presets["quick"]["defaults"]["evals_per_epoch"] = 1
    quick = dataclasses.replace(quick, presets=presets)
    rows, chosen = {}, {}
    for model in quick.models:
        for precision in PRECISIONS:
            everywhere = dict.fromkeys(KINDS, precision)
            run = train_once("ptb", model, data,
                             dataclasses.replace(quick, cuda_precision=everywhere),
                             work / f"precision-{model}-{precision}")
            rows[model, precision] = {"valid_ppl": run["valid_ppl"],
                                      "tokens_per_s": run["tokens_per_s"],
                                      "wall_s": run["wall_s"]}
            write_json(out / "precision.json", {f"{m}/{p}": r for (m, p), r in rows.items()})
        chosen[model] = choose({p: rows[model, p]["valid_ppl"] for p in PRECISIONS},
                               {p: rows[model, p]["tokens_per_s"] for p in PRECISIONS})
    lines = ["| model | " + " | ".join(f"{p} valid ppl | {p} tokens/s" for p in PRECISIONS)
             + " | chosen |", "|---|" + "---|" * (2 * len(PRECISIONS) + 1)]
    lines += [f"| {m} | " + " | ".join(f"{rows[m, p]['valid_ppl']:.2f} | "
                                       f"{rows[m, p]['tokens_per_s']:,.0f}" for p in PRECISIONS)
              + f" | {chosen[m]} |" for m in quick.models]
    write_text(out / "precision.md", "\n".join(lines) + "\n")
    return "**precision** (PTB quick, one validation per epoch): chosen " + ", ".join(
        f"{m} {p}" for m, p in chosen.items()) + f"; {out / 'precision.md'}"


def run_part(part: str, params: TrainParams, device: str, args: argparse.Namespace) -> str:
    """Run one part of the checklist; its paragraph for summary.md."""
    if part == "graphs":
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_graphed.py"], capture_output=True, text=True)
        write_text(args.out / "graphs.txt", done.stdout[-20000:] + done.stderr[-5000:])
        last = (done.stdout.strip().splitlines() or ["no output"])[-1]
        if done.returncode != 0:
            raise RuntimeError(f"tests/test_graphed.py: {last}; later parts train eagerly")
        return f"**graphs**: tests/test_graphed.py: {last}"
    if part == "medium":
        medium = dataclasses.replace(params, preset="medium")
        return medium_verdict(reproduce(medium, "ptb", "lstm2", args.data, args.out,
                                        args.work))
    if part == "scoring":
        return scoring(params, args.data, args.out, args.work)
    if part == "peer":
        return peer(params, args.out)
    if part == "throughput":
        throughput.main(["--presets", "medium", "quick", "--profile", "",
                         "--results", str(args.out)])
        return f"**throughput**: {args.out / f'throughput-{device}.md'}"
    if part == "precision":
        return precision_part(params, args.data, args.out, args.work)
    quick = dataclasses.replace(params, preset="quick", checkpoint_every_s=0,
                                cuda_precision=dict.fromkeys(KINDS, "fp32"))
    presets = json.loads(json.dumps(quick.presets))
    presets["quick"]["models"]["lstm2"]["epochs"] = 1
    return determinism(dataclasses.replace(quick, presets=presets), args.data, args.out,
                       args.work)


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
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    for part in args.parts:
        started = time.perf_counter()
        try:
            text = run_part(part, params, device, args)
        except (TrainingInterrupted, Stopped) as exc:  # the whole command stops
            append(summary, f"**{part}**: stopped ({exc}) after "
                   f"{time.perf_counter() - started:,.0f} s; later parts not run")
            print(f"{part}: stopped ({exc})", flush=True)
            return
        except (Exception, SystemExit) as exc:  # the next parts still run
            import traceback

            traceback.print_exc()  # on stderr, for whoever debugs it; summary.md gets a line
            said = (str(exc).splitlines() or [""])[0]
            text = f"**{part}**: failed: {type(exc).__name__}: {said}"
            if part == "graphs":
                params = dataclasses.replace(params, cuda_graphs=False)
        append(summary, f"{text} ({time.perf_counter() - started:,.0f} s)")
        print(text, flush=True)


if __name__ == "__main__":
    run_stage(main)
