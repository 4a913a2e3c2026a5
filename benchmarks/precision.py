"""Quality and speed of bf16 training against fp32: one model, trained in each precision by
the train stage's own function, under the committed preset, once per seed.

    python -m benchmarks.precision [--corpus ptb] [--model lstm2] [--data data/prepared/ptb]
                                   [--seeds 1 2 3] [--preset quick]
    python -m benchmarks.precision --regression [--seeds 1 2 3]

Both precisions train the same steps on the same data from each seed; only the training
steps' precision differs (`train.cpu_precision` on a CPU, `train.cuda_precision` on CUDA);
all runs are scored in fp32 by the one scorer. The check the precision setting must
pass: valid perplexity at most 1% above fp32's (`pipeline.precision.acceptable`), on the
mean over the seeds. Two trainings
that differ only in rounding drift apart like two seeds do, so the seeds also measure how
far fp32 lands from itself: the band the 1% is to be read against. Needs the corpus
prepared (`dvc repro prepare@ptb`). Writes benchmarks/results/precision-<device>.md
(--results: another folder).

--regression runs the same comparison on the regression configuration instead
(tests/regression.py: its corpora, every neural model, tiny, one thread), its train
stages only, in a fresh workspace per precision and seed, and compares every neural
model's valid perplexity. Writes benchmarks/results/precision-regression-<device>.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.throughput import RESULTS, device_name
from pipeline.atomic import write_text
from pipeline.corpora import CORPUS_NAMES
from pipeline.errors import run_stage
from pipeline.hostmemory import reuse_freed_memory
from pipeline.networks import KINDS
from pipeline.neural import pick_device, train_and_score
from pipeline.params import load_section
from pipeline.precision import TOLERANCE, acceptable, bf16_products
from pipeline.presets import TrainParams

PRECISIONS = ("fp32", "bf16 autocast")


def train_once(corpus: str, model: str, data: Path, params: TrainParams, folder: Path) -> dict:
    started = time.perf_counter()
    metrics = train_and_score(corpus, model, data, folder / "ckpt", folder / "model.pt",
                              folder / "curve.json", params)
    return metrics | {"wall_s": time.perf_counter() - started}


def with_seed(params: TrainParams, corpus: str, seed: int) -> TrainParams:
    """`params` with train.presets.<preset>.corpora.<corpus>.seed set to `seed`."""
    presets = copy.deepcopy(params.presets)
    corpora = presets[params.preset].setdefault("corpora", {})
    corpora[corpus] = {**(corpora.get(corpus) or {}), "seed": seed}
    return dataclasses.replace(params, presets=presets)


def report(runs: dict, seeds: list[int], head: str) -> str:
    """The results file: one row per run, the means, the verdict."""
    valid = {k: statistics.fmean(runs[k, s]["valid_ppl"] for s in seeds) for k in PRECISIONS}
    speed = {k: statistics.fmean(runs[k, s]["tokens_per_s"] for s in seeds) for k in PRECISIONS}
    change = valid["bf16 autocast"] / valid["fp32"] - 1
    lines = [head, "", "| training precision | seed | valid ppl | test ppl | train tokens/s "
             "| stage wall (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {s} | {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['wall_s']:,.0f} |" for (k, s), r in runs.items()]
    lines += [""] + [f"{k}: mean valid ppl {valid[k]:.2f} over {len(seeds)} seed(s), valid ppl "
                     f"from {min(runs[k, s]['valid_ppl'] for s in seeds):.2f} to "
                     f"{max(runs[k, s]['valid_ppl'] for s in seeds):.2f}" for k in PRECISIONS]
    per_seed = [runs["bf16 autocast", s]["valid_ppl"] / runs["fp32", s]["valid_ppl"] - 1
                for s in seeds]
    verdict = "pass" if acceptable(valid["bf16 autocast"], valid["fp32"]) else "FAIL"
    lines += ["", f"valid perplexity, bf16 against fp32 (means): {change:+.2%} (allowed: at most "
              f"{TOLERANCE:.0%} worse): {verdict}; per seed: "
              + ", ".join(f"{c:+.2%}" for c in per_seed)
              + f"; training speed x{speed['bf16 autocast'] / speed['fp32']:.2f}"]
    return "\n".join(lines) + "\n"


def regression_changes(precision: str, seed: int) -> list[str]:
    """The params changes (tests.regression's KEY=VALUE) for one run of the regression
    configuration: the precision, and the seed of its preset's defaults (no layer of the
    regression configuration sets a seed of its own; tests/test_benchmarks.py checks it)."""
    from tests import regression

    preset = regression.configuration()["train"]["preset"]
    return [f"train.cpu_precision={'fp32' if precision == 'fp32' else 'bf16'}",
            f"train.presets.{preset}.defaults.seed={seed}"]


def regression_runs(seeds: list[int]) -> dict:
    """(precision, seed) -> {corpus/model: valid ppl} of the regression configuration's
    neural models, each pair trained in a fresh workspace by `dvc repro` of the train stages."""
    from tests import regression

    mirror = regression.mirror()
    runs = {}
    for seed in seeds:
        for name in PRECISIONS:
            with tempfile.TemporaryDirectory(prefix="lmb-precision-") as tmp:
                repo, env = regression.make_workspace(Path(tmp), mirror)
                regression.change_params(repo / "params.yaml", regression_changes(name, seed))
                done = regression.repro(repo, env, "--glob", "train@*")
                if done.returncode != 0:
                    raise SystemExit(f"dvc repro failed ({name}, seed {seed}):\n"
                                     f"{(done.stdout + done.stderr)[-3000:]}")
                runs[name, seed] = {row: v["valid_ppl"] for row, v in
                                    regression.collect(repo).items() if v["family"] == "neural"}
            print(f"{name}, seed {seed}: {len(runs[name, seed])} models trained", flush=True)
    first = runs["fp32", seeds[0]]
    for key, models in runs.items():
        if models.keys() != first.keys():  # a stage that failed without failing dvc repro
            missing = sorted(first.keys() ^ models.keys())
            raise SystemExit(f"{key[0]}, seed {key[1]}: not the same models as fp32, seed "
                             f"{seeds[0]} (differ: {', '.join(missing)}); nothing compared")
    return runs


def regression_report(runs: dict, seeds: list[int], head: str) -> str:
    """One row per model: the mean valid ppl of each precision, the change, the spread."""
    lines = [head, "", "| model | fp32 valid ppl (mean) | bf16 valid ppl (mean) | bf16 against "
             "fp32 | per seed | fp32 from itself (max/min over seeds) |",
             "|---|---|---|---|---|---|"]
    beyond = 0
    for row in sorted(runs["fp32", seeds[0]]):
        fp32 = [runs["fp32", s][row] for s in seeds]
        bf16 = [runs["bf16 autocast", s][row] for s in seeds]
        change = statistics.fmean(bf16) / statistics.fmean(fp32) - 1
        worse = not acceptable(statistics.fmean(bf16), statistics.fmean(fp32))
        beyond += worse
        lines.append(f"| {row} | {statistics.fmean(fp32):.2f} | {statistics.fmean(bf16):.2f} | "
                     f"{change:+.2%}{' (worse by over 1%)' if worse else ''} | "
                     + ", ".join(f"{b / f - 1:+.2%}" for b, f in zip(bf16, fp32, strict=True))
                     + f" | {max(fp32) / min(fp32) - 1:.2%} |")
    lines += ["", f"{beyond} of {len(runs['fp32', seeds[0]])} models worse by over "
              f"{TOLERANCE:.0%} (means over {len(seeds)} seed(s)): "
              f"{'pass' if beyond == 0 else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="ptb", choices=CORPUS_NAMES)
    parser.add_argument("--model", default="lstm2", choices=KINDS)
    parser.add_argument("--data", type=Path, default=Path("data/prepared/ptb"))
    parser.add_argument("--preset", help="another preset than train.preset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1],
                        help="train each precision once per seed; judged on the means")
    parser.add_argument("--regression", action="store_true",
                        help="compare on the regression configuration (tests/regression.py)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the table goes")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: each seed once, got {' '.join(map(str, args.seeds))}")
    params = load_section("train", TrainParams)
    if args.preset:
        if args.preset not in params.presets:
            parser.error(f"--preset: unknown preset {args.preset!r}; defined: "
                         f"{', '.join(params.presets)}")
        params = dataclasses.replace(params, preset=args.preset)
    # the regression configuration trains on the CPU (train.device: cpu), wherever it runs
    device = "cpu" if args.regression else pick_device(params.device)
    reuse_freed_memory()  # as the train stage's process does
    if not bf16_products(device):
        raise SystemExit(f"{device}: no hardware bf16 matrix products here; nothing to compare")
    if args.regression:
        head = (f"bf16 against fp32 training on the regression configuration "
                f"(tests/regression.py; cpu, {device_name('cpu')}, 1 thread, CPU capability "
                f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}: "
                "valid perplexity of every neural model; scored in fp32")
        text = regression_report(regression_runs(args.seeds), args.seeds, head)
        print(text)
        write_text(args.results / "precision-regression-cpu.md", text)
        return
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lmb-precision-") as tmp:
        for seed in args.seeds:
            for name in PRECISIONS:
                bf16 = name != "fp32"
                everywhere = {model: "bf16" if bf16 else "fp32" for model in KINDS}
                chosen = dataclasses.replace(with_seed(params, args.corpus, seed),
                                             cuda_precision=everywhere,
                                             cpu_precision="bf16" if bf16 else "fp32",
                                             checkpoint_every_s=0)
                runs[name, seed] = train_once(args.corpus, args.model, args.data, chosen,
                                              Path(tmp) / f"{name.split()[0]}-{seed}")
                print(f"{name}, seed {seed}: valid ppl {runs[name, seed]['valid_ppl']:.2f}",
                      flush=True)
    fp32 = runs["fp32", args.seeds[0]]
    head = (f"bf16 against fp32 training on {device} ({device_name(device)}, "
            f"{torch.get_num_threads()} threads, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}: "
            f"{args.corpus} {args.model}, {params.preset} preset, {fp32['train_tokens']:,} "
            f"training tokens ({fp32['epochs']:g} epochs) per run; scored in fp32")
    text = report(runs, args.seeds, head)
    print(text)
    write_text(args.results / f"precision-{device}.md", text)


if __name__ == "__main__":
    run_stage(main)
