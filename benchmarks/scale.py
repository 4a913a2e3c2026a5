"""Prepare and n-gram cost against corpus size: tokens/s and peak memory.

    python -m benchmarks.scale [--sizes 1M 5M 20M] [--orders 3 5] [--memory 1G]

For each size, a generated word corpus (`generate_corpus`: Zipf-distributed
phrases of Zipf-distributed words over a 50,000-word vocabulary, lines of mean
length 20; train of that many tokens, valid and test of 100,000 each) goes
through the stages' own code, each step in a fresh process whose peak resident
set size is read from the kernel (os.wait4), the way `/usr/bin/time -v` reads it:

- prepare: `pipeline.encoding.prepare_corpus` (both streaming passes, all splits);
- ngram, per order: the training text (`pipeline.kneser_ney.write_training_text`),
  lmplz with `-S memory` (params `ngram.memory`, 1G by default) and build_binary
  (probing, the default; and the 8-bit quantized trie, for its size).

Tokens/s are train tokens (prepare: all three splits) over wall-clock seconds.
The text is not natural language: its n-gram counts grow with size like real
text's only roughly, so the n-gram rows are a guide to the cost, not a forecast.
Writes benchmarks/results/scale-cpu.md with the machine, its load, and an
extrapolation to WikiText-103's 103M training tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# `python benchmarks/scale.py` must import this checkout's pipeline, not an installed one
sys.path.insert(0, str(REPO))

from pipeline.atomic import write_text  # noqa: E402
from pipeline.errors import run_stage  # noqa: E402
from pipeline.kenlm_tools import tool_path  # noqa: E402
from pipeline.kneser_ney import MEMORY_SIZE  # noqa: E402

WIKITEXT103_TRAIN_TOKENS = 103_227_021  # words + one <eos> per line (Merity et al. 2016)
HELD_OUT_TOKENS = 100_000
RESULTS = REPO / "benchmarks" / "results" / "scale-cpu.md"


def generate_corpus(folder: Path, train_tokens: int, vocab: int = 50_000,
                    held_out: int = HELD_OUT_TOKENS, mean_line: int = 20, zipf: float = 1.0,
                    phrases: int = 200_000, seed: int = 0) -> Path:
    """A `custom` corpus folder (train/valid/test.txt) of words `w0`.. over `vocab` types.

    Text that repeats itself somewhat as language does: an inventory of `phrases`
    phrases of 1 to 6 Zipf-distributed words, drawn Zipf-distributed themselves, with a
    line end after a phrase so that lines are `mean_line` tokens long on average. (Plain
    independent words would have no repeated 5-grams: KenLM's discount estimation
    fails on them.) Written a block at a time: seconds for 20M tokens, memory of a block."""
    rng = np.random.default_rng(seed)

    def zipf_draw(n: int, types: int) -> np.ndarray:
        cdf = np.cumsum(1.0 / np.arange(1, types + 1) ** zipf)
        return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(n)), types - 1)

    lengths = rng.integers(1, 7, phrases)
    words = zipf_draw(int(lengths.sum()), vocab)
    starts = np.cumsum(lengths) - lengths
    end_prob = lengths.mean() / mean_line  # per phrase
    lut = [f"w{i}" for i in range(vocab)] + ["\n"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, tokens in (("train", train_tokens), ("valid", held_out), ("test", held_out)):
        with open(folder / f"{split}.txt", "w", encoding="ascii") as f:
            left = tokens
            while left > 0:
                drawn = zipf_draw(min(left, 1 << 20) // 3 + 1, phrases)
                lens = lengths[drawn] + (rng.random(len(drawn)) < end_prob)  # + line end
                ids = np.repeat(starts[drawn] - (np.cumsum(lens) - lens), lens) \
                    + np.arange(lens.sum())
                ids = words[np.minimum(ids, len(words) - 1)]
                ids[np.cumsum(lens)[lens > lengths[drawn]] - 1] = vocab  # the line ends
                ids = ids[:left]
                if len(ids) > 1 and ids[-2] == vocab:
                    ids[-2] = 0  # no blank line (prepare would skip it)
                ids[-1] = vocab  # a block ends a line: the next one starts a new line
                text = " ".join([lut[i] for i in ids.tolist()])
                f.write(text.replace(" \n", "\n").replace("\n ", "\n"))
                left -= len(ids)
    return folder


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_mb: float  # the process's maximum resident set size
    stdout: str


# Runs argv[2:] and writes "seconds peak_kb" of that child to argv[1]. A child's peak RSS
# starts at its parent's (Linux carries the high-water mark through fork and exec), so the
# measured command is started from this small process, never from a large one.
WAIT4 = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - started} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


REPEATS = 1  # --repeats: each measurement's best time (and highest peak) of this many runs


def measure(cmd: list[str], env: dict | None = None) -> Measured:
    """`measure_once` REPEATS times: the shortest time (the least disturbed by other load
    on the machine) and the highest peak memory."""
    runs = [measure_once(cmd, env) for _ in range(REPEATS)]
    return Measured(min(r.seconds for r in runs), max(r.peak_mb for r in runs), runs[0].stdout)


def measure_once(cmd: list[str], env: dict | None = None) -> Measured:
    """Run `cmd` to completion; its wall-clock time and its own peak resident set size
    (of that process alone, from os.wait4, as `/usr/bin/time -v` reports it)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "usage"
        done = subprocess.run([sys.executable, "-S", "-c", WAIT4, str(result), *cmd],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stderr[-3000:]}")
        seconds, peak_kb = result.read_text().split()
    return Measured(float(seconds), int(peak_kb) / 1024, done.stdout)


def python_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


PREPARE = """
import sys
from pathlib import Path
from pipeline.encoding import CustomCorpusParams, PrepareParams, prepare_corpus
params = PrepareParams(custom=CustomCorpusParams(level="word", ratios=(0.8, 0.1, 0.1),
                                                 min_count=1))
prepare_corpus("custom", Path(sys.argv[1]), Path(sys.argv[2]), params)
"""

TRAINING_TEXT = """
import sys
from pathlib import Path
from pipeline.dataset import PreparedCorpus
from pipeline.kneser_ney import write_training_text
write_training_text(PreparedCorpus(Path(sys.argv[1])), Path(sys.argv[2]))
"""


def measure_prepare(raw: Path, out: Path) -> Measured:
    return measure([sys.executable, "-c", PREPARE, str(raw), str(out)], python_env())


def measure_training_text(prepared: Path, text: Path) -> Measured:
    return measure([sys.executable, "-c", TRAINING_TEXT, str(prepared), str(text)],
                   python_env())


def measure_lmplz(text: Path, arpa: Path, order: int, memory: str, tmp: Path) -> Measured:
    return measure([str(tool_path("lmplz")), "-o", str(order), "-S", memory, "-T", f"{tmp}/",
                    "--text", str(text), "--arpa", str(arpa)])


def measure_build_binary(arpa: Path, binary: Path, args: tuple[str, ...] = ()) -> Measured:
    return measure([str(tool_path("build_binary")), *args, str(arpa), str(binary)])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = names[0].strip() if names else cpu
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, {platform.system()}"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def parse_size(text: str) -> int:
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].isalpha() else int(text)


def prepare_wide(size: int, work: Path) -> dict:
    """Prepare alone on `size` tokens over a WikiText-103-sized vocabulary (300,000 word
    types, of which about 230,000 occur): what the vocabulary's counts add to memory."""
    raw, prepared = work / "raw-wide", work / "prepared-wide"
    generate_corpus(raw, size, vocab=300_000, phrases=2_000_000)
    prep = measure_prepare(raw, prepared)
    vocab = json.loads((prepared / "vocab.json").read_text(encoding="utf-8"))
    row = {"train_tokens": vocab["tokens_per_split"]["train"], "types": vocab["vocab_size"],
           "all_tokens": sum(vocab["tokens_per_split"].values()), "prepare": prep,
           "raw_mb": sum(p.stat().st_size for p in raw.iterdir()) / 2**20}
    print(f"{size:,} over {row['types']:,} types: prepare {prep.seconds:.1f} s, "
          f"{prep.peak_mb:.0f} MB", flush=True)
    shutil.rmtree(raw)
    shutil.rmtree(prepared)
    return row


def run(sizes: list[int], orders: list[int], memory: str, work: Path) -> list[dict]:
    rows = []
    for size in sizes:
        raw, prepared = work / f"raw-{size}", work / f"prepared-{size}"
        generate_corpus(raw, size)
        prep = measure_prepare(raw, prepared)
        all_tokens = sum(np.load(prepared / f"{s}.npy", mmap_mode="r").size
                         for s in ("train", "valid", "test"))
        train_tokens = int(np.load(prepared / "train.npy", mmap_mode="r").size)
        types = json.loads((prepared / "vocab.json").read_text(encoding="utf-8"))["vocab_size"]
        text = work / "train.txt"
        written = measure_training_text(prepared, text)
        row = {"size": size, "train_tokens": train_tokens, "all_tokens": all_tokens,
               "types": types,
               "prepare": prep, "text": written, "raw_mb": sum(
                   p.stat().st_size for p in raw.iterdir()) / 2**20, "orders": {}}
        print(f"{size:,}: prepare {prep.seconds:.1f} s, {prep.peak_mb:.0f} MB; "
              f"training text {written.seconds:.1f} s", flush=True)
        for order in orders:
            arpa, binary = work / f"kn{order}.arpa", work / f"kn{order}.bin"
            lm = measure_lmplz(text, arpa, order, memory, work)
            probing = measure_build_binary(arpa, binary)
            probing_mb = binary.stat().st_size / 2**20
            quantized = measure_build_binary(arpa, binary, ("-S", memory, "-T", f"{work}/",
                                                            "-q", "8", "-b", "8", "trie"))
            row["orders"][order] = {
                "lmplz": lm, "probing": probing, "probing_mb": probing_mb,
                "trie_q8": quantized, "trie_q8_mb": binary.stat().st_size / 2**20,
                "arpa_mb": arpa.stat().st_size / 2**20, "ngrams": ngram_total(arpa)}
            print(f"  order {order}: lmplz {lm.seconds:.1f} s {lm.peak_mb:.0f} MB, "
                  f"build_binary {probing.seconds:.1f} s {probing.peak_mb:.0f} MB "
                  f"({probing_mb:.0f} MB file)", flush=True)
            arpa.unlink()
            binary.unlink()
        text.unlink()
        shutil.rmtree(raw)
        shutil.rmtree(prepared)
        rows.append(row)
    return rows


def ngram_total(arpa: Path) -> int:
    total = 0
    with open(arpa, encoding="ascii") as f:
        for line in f:
            match = re.match(r"ngram \d+=(\d+)", line)
            if match:
                total += int(match[1])
            elif line.startswith("\\1-grams:"):
                break
    return total


def report(rows: list[dict], wide: dict, orders: list[int], memory: str,
           started_load: str) -> str:
    lines = [
        "# Scale: prepare and n-gram cost against corpus size",
        "",
        f"Machine: {machine()}. Load average (1/5/15 min) at the start: {started_load}, "
        f"at the end: {load()} (the machine was shared; a load above the core count "
        "slows the figures). Written by `python -m benchmarks.scale` "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; each time the best of "
        f"{REPEATS} run(s).",
        "",
        "Corpus: generated text (`benchmarks/scale.py: generate_corpus`): Zipf-distributed "
        "phrases of 1-6 Zipf-distributed words over 50,000 types, lines of mean length 20 "
        "(train of the given size; valid and test 100,000 tokens each). "
        f"lmplz with `-S {memory}` (`ngram.memory`). Peak memory is each process's maximum "
        "resident set size. Tokens/s: train tokens (prepare: all splits) per wall-clock "
        "second.",
        "",
        "## Prepare (streaming; two passes)",
        "",
        "| train tokens | vocabulary | raw text | seconds | tokens/s | peak memory |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [*rows, wide]:
        prep = row["prepare"]
        lines.append(f"| {row['train_tokens']:,} | {row['types']:,} | {row['raw_mb']:.0f} MB | "
                     f"{prep.seconds:.1f} | {row['all_tokens'] / prep.seconds:,.0f} | "
                     f"{prep.peak_mb:.0f} MB |")
    lines += ["", "The last row: the same size over a WikiText-103-sized vocabulary "
              "(WikiText-103 has 267,735 types): memory is the vocabulary's, not the corpus's."]
    lines += [
        "",
        "## N-gram (KenLM): training text, lmplz, build_binary",
        "",
        "| train tokens | order | n-grams | text s | lmplz s | lmplz tokens/s | lmplz peak "
        "| build_binary s | build_binary peak | probing file | trie -q 8 file |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for order in orders:
            o = row["orders"][order]
            lines.append(
                f"| {row['train_tokens']:,} | {order} | {o['ngrams']:,} | "
                f"{row['text'].seconds:.1f} | {o['lmplz'].seconds:.1f} | "
                f"{row['train_tokens'] / o['lmplz'].seconds:,.0f} | {o['lmplz'].peak_mb:.0f} MB | "
                f"{o['probing'].seconds:.1f} | {o['probing'].peak_mb:.0f} MB | "
                f"{o['probing_mb']:.0f} MB | {o['trie_q8_mb']:.0f} MB |")
    lines += ["", "## Extrapolation to WikiText-103 (103M training tokens)", ""]
    lines += extrapolate(rows, wide, orders, memory)
    return "\n".join(lines) + "\n"


def extrapolate(rows: list[dict], wide: dict, orders: list[int], memory: str) -> list[str]:
    """Linear in tokens from the largest size (every step reads its input once or a
    fixed number of times); memory: prepare's is flat, lmplz's is capped by -S."""
    big = rows[-1]
    factor = WIKITEXT103_TRAIN_TOKENS / big["train_tokens"]
    prep = big["prepare"]
    out = [
        f"Scaled linearly from the {big['train_tokens']:,}-token row (x{factor:.1f}):",
        "",
        f"- prepare: about {duration(prep.seconds * factor)} (about "
        f"{duration(wide['prepare'].seconds * WIKITEXT103_TRAIN_TOKENS / wide['train_tokens'])}"
        f" at the speed of the {wide['types']:,}-type row); peak memory about "
        f"{wide['prepare'].peak_mb:.0f} MB (the {wide['types']:,}-type row: it streams, and "
        "holds the vocabulary's counts).",
        f"- training text for lmplz: about {duration(big['text'].seconds * factor)}.",
    ]
    for order in orders:
        o = big["orders"][order]
        ngrams = o["ngrams"] * factor
        out.append(
            f"- order {order}: lmplz about {duration(o['lmplz'].seconds * factor)}, its memory "
            f"capped by `-S` (measured {o['lmplz'].peak_mb:.0f} MB under `-S {memory}`); "
            f"build_binary about {duration(o['probing'].seconds * factor)}. The binary, and "
            "build_binary's and the scoring's memory, go with the number of n-grams: "
            f"{o['probing_mb'] * 2**20 / o['ngrams']:.0f} bytes per n-gram probing, "
            f"{o['trie_q8_mb'] * 2**20 / o['ngrams']:.0f} with `binary: trie-q8`; at "
            f"{ngrams / 1e6:.0f}M n-grams (this text's count, grown linearly) that is "
            f"{o['probing_mb'] * factor / 1024:.1f} GB probing, "
            f"{o['trie_q8_mb'] * factor / 1024:.1f} GB trie-q8.")
    out += ["", "Natural text has more distinct high-order n-grams than this generated text "
            "(whose phrases repeat): take the count lmplz prints for your corpus times the "
            "bytes per n-gram above, or prune (`ngram.prune`). lmplz's memory stays within "
            "`-S` whatever the count; its time and the ARPA's size grow with it.",
            "",
            "Disk: the training text, the ARPA and lmplz's sort files go to "
            "`ngram.temp_dir`; the ARPA of the largest row here was " + ", ".join(
                f"{big['orders'][o]['arpa_mb']:.0f} MB (order {o})" for o in orders)
            + ", about "
            + ", ".join(f"{big['orders'][o]['arpa_mb'] * 2**20 / big['orders'][o]['ngrams']:.0f}"
                        f" bytes per n-gram (order {o})" for o in orders) + "."]
    return out


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.0f} min"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "5M", "20M"])
    parser.add_argument("--orders", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--memory", default="1G", help="lmplz -S (params ngram.memory)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (big disk)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per measurement, best time kept (a shared machine)")
    args = parser.parse_args(argv)
    bad_size = next((s for s in args.sizes if not re.fullmatch(r"\d+|\d+(\.\d+)?[KMG]", s, re.I)
                     or parse_size(s) < 1), None)
    if bad_size is not None:
        parser.error(f"--sizes: expected a token count like 500K, 5M or 20000, got {bad_size!r}")
    if not all(2 <= order <= 6 for order in args.orders):
        parser.error(f"--orders: each order must be 2..6, got {args.orders}")
    if not MEMORY_SIZE.fullmatch(args.memory):
        parser.error(f"--memory: expected a size like 1G or 20%, got {args.memory!r}")
    if args.repeats < 1:
        parser.error(f"--repeats: must be >= 1, got {args.repeats}")
    global REPEATS
    REPEATS = args.repeats
    started_load = load()
    with tempfile.TemporaryDirectory(prefix="lmb-scale-", dir=args.work) as work:
        rows = run([parse_size(s) for s in args.sizes], args.orders, args.memory, Path(work))
        wide = prepare_wide(parse_size(args.sizes[-1]), Path(work))
    text = report(rows, wide, args.orders, args.memory, started_load)
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    run_stage(main)
