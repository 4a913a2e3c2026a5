"""Modified Kneser-Ney n-grams via KenLM: build, score, and the token <-> KenLM word
mapping every n-gram user shares (the `ngram` stage's work, pipeline/stages/ngram.py).

lmplz estimates the model from the prepared training ids, build_binary converts
the ARPA to KenLM's binary format, and the `kenlm` module scores valid and test
sentence by sentence (each sentence starts from KenLM's <s> context; its </s> is
our <eos>, predicted and counted). Tokens are handed to KenLM as `t<id>`: the
same vocabulary as every other model, with no whitespace or `<unk>` clashes
(KenLM reserves the literal `<unk>`), for word and character corpora alike.

Large corpora: the training text is written from the memory-mapped ids a chunk
at a time, lmplz sorts in at most `memory` and on disk beyond it (in `temp_dir`;
the model is the same), `prune` drops rare high-order n-grams, and `binary` picks
a smaller trie, optionally quantized, for models too large for a probing table.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.corpora import CORPUS_NAMES
from pipeline.dataset import PreparedCorpus
from pipeline.errors import UserError
from pipeline.kenlm_tools import KENLM_VERSION, tool_path
from pipeline.lineup import ngram_name
from pipeline.params import require
from pipeline.perplexity import SplitScore

EVAL_SPLITS = ("valid", "test")
# build_binary arguments per `binary` param: probing (its default, fastest, largest), trie
# (about a third of probing's memory, same scores), trie-q8 (8-bit quantized
# probabilities and backoffs: smaller still, and the scores move a little)
BINARY_ARGS = {"probing": [], "trie": ["trie"], "trie-q8": ["-q", "8", "-b", "8", "trie"]}


class NgramError(UserError, RuntimeError):
    pass


MEMORY_SIZE = re.compile(r"\d+[%bKMGT]?")  # lmplz -S: bytes, a unit, or a share of RAM


@dataclass(frozen=True)
class NgramParams:
    orders: tuple[int, ...]
    discount_fallback: tuple[str, ...]  # corpora opted in to KenLM's fallback discounts
    memory: str  # lmplz -S (and build_binary -S for a trie), e.g. "1G" or "20%"
    # The scale options below are required in params.yaml like every key (the loader
    # rejects a missing one); these values, which change nothing, serve code that builds
    # params by hand (tests, benchmarks).
    temp_dir: str = ""  # folder of the stage's temporary files (lmplz -T); "" = the system's
    prune: tuple[int, ...] = ()  # lmplz --prune thresholds from unigrams up; () = none
    binary: str = "probing"  # a key of BINARY_ARGS

    def validate(self, key: str) -> None:
        # kenlm.Model loads orders 2..6 (an order-1 ARPA is refused; 6 is its compiled maximum)
        for order in self.orders:
            require(2 <= order <= 6, f"{key}.orders", f"each order must be 2..6, got {order}")
        require(len(set(self.orders)) == len(self.orders), f"{key}.orders",
                f"each order once, got {list(self.orders)}")
        for corpus in self.discount_fallback:
            require(corpus in CORPUS_NAMES, f"{key}.discount_fallback",
                    f"unknown corpus {corpus!r}; known: {', '.join(CORPUS_NAMES)}")
        require(bool(MEMORY_SIZE.fullmatch(self.memory)), f"{key}.memory",
                f"expected a size like 1G or 20%, got {self.memory!r}")
        prune = list(self.prune)
        require(not prune or (prune[0] == 0 and all(t >= 0 for t in prune)
                              and prune == sorted(prune)), f"{key}.prune",
                "expected non-decreasing counts starting with 0 (KenLM does not prune "
                f"unigrams), e.g. [0, 0, 1], or [] for none; got {prune}")
        require(self.binary in BINARY_ARGS, f"{key}.binary",
                f"expected one of {', '.join(BINARY_ARGS)}, got {self.binary!r}")
        require(not self.temp_dir or os.path.isdir(os.path.expanduser(self.temp_dir)),
                f"{key}.temp_dir", f"no folder at {self.temp_dir!r}")

    def prune_args(self, order: int) -> list[str]:
        """lmplz's --prune for a model of `order`: a threshold per order (the last given
        applies to the orders above it); none if nothing would be pruned."""
        if not any(self.prune):
            return []
        thresholds = [self.prune[min(n, len(self.prune) - 1)] for n in range(order)]
        return ["--prune", *map(str, thresholds)] if any(thresholds) else []


def kenlm_word(token_id: int) -> str:
    return f"t{token_id}"


def kenlm_sentence(ids: np.ndarray) -> str:
    return " ".join(kenlm_word(int(i)) for i in ids)


def write_training_text(data: PreparedCorpus, path: Path) -> None:
    """One line of `kenlm_sentence` per train line, written a chunk of lines at a time."""
    words = [kenlm_word(i) for i in range(data.meta["vocab_size"])]
    words[data.vocabulary().eos_id] = "\n"
    with open(path, "w", encoding="ascii") as f:
        for piece in tqdm(data.line_chunks("train"), desc="write train text", unit=" chunk",
                          leave=False, disable=None):
            # "t1 t2 \n t3 \n" -> "t1 t2\nt3\n": words hold no space or line break
            text = " ".join([words[i] for i in piece.tolist()])
            f.write(text.replace(" \n", "\n").replace("\n ", "\n"))


def estimate_arpa(corpus: str, text: Path, arpa: Path, order: int, memory: str,
                  discount_fallback: bool, tmp: Path, prune: list[str] = ()) -> None:
    cmd = [str(tool_path("lmplz")), "-o", str(order), "-S", memory, "-T", f"{tmp}/",
           "--text", str(text), "--arpa", str(arpa), *prune]
    if discount_fallback:
        cmd.append("--discount_fallback")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [ln for ln in result.stderr.splitlines() if "ERROR" in ln or "threw" in ln]
        said = "\n".join(errors) or result.stderr.strip()[-2000:]
        if "discount" in said.lower() and not discount_fallback:
            raise NgramError(
                f"KenLM could not estimate Kneser-Ney discounts for {corpus} (order {order}): "
                "its training split is too small or too regular (e.g. a character "
                f"vocabulary). Add {corpus!r} to params `ngram.discount_fallback` to use "
                "KenLM's fallback discounts (0.5, 1, 1.5); the metrics will record it.\n"
                f"lmplz said: {said}"
            )
        raise NgramError(f"lmplz failed for {corpus} order {order} "
                         f"(exit {result.returncode}): {said}")


def arpa_counts(arpa: Path) -> dict[int, int]:
    """The `ngram N=count` lines of an ARPA header."""
    counts: dict[int, int] = {}
    with open(arpa, encoding="ascii") as f:
        for line in f:
            match = re.match(r"ngram (\d+)=(\d+)", line)
            if match:
                counts[int(match[1])] = int(match[2])
            elif line.startswith("\\1-grams:"):
                break
    return counts


def score_split(model, data: PreparedCorpus, split: str) -> SplitScore:
    """Sum of log-probabilities over every sentence of `split`, </s> included.

    KenLM must know every token: the vocabulary came from train, so any OOV means
    the data and the model disagree. The one exception is <unk> when the training
    split never contained it; KenLM then scores it with its own <unk> probability."""
    vocab = data.vocabulary()
    unk_word = kenlm_word(vocab.unk_id)
    unk_in_train = data.meta["train_counts"][vocab.unk_id] > 0
    total_log10 = 0.0
    tokens = 0
    for sentence in tqdm(data.sentences(split), desc=f"score {split}", unit=" sent",
                         total=data.meta["lines_per_split"][split], leave=False, disable=None):
        words = kenlm_sentence(sentence)
        oov_words = [w for w in words.split() if w not in model]
        if oov_words and (unk_in_train or set(oov_words) != {unk_word}):
            raise NgramError(
                f"KenLM reports out-of-vocabulary tokens in {split}: {oov_words[:5]} "
                "(the prepared data and the n-gram model disagree; rerun prepare)"
            )
        total_log10 += model.score(words, bos=True, eos=True)
        tokens += len(sentence) + 1
    expected = data.meta["tokens_per_split"][split]
    if tokens != expected:
        raise NgramError(f"scored {tokens} tokens of {split}, prepare counted {expected}")
    return SplitScore.from_log10(total_log10, tokens)


def build_ngram(corpus: str, order: int, data_dir: Path, model_path: Path,
                params: NgramParams) -> dict:
    """Estimate, binarize and score one n-gram; return its metrics."""
    import kenlm

    data = PreparedCorpus(data_dir)
    level = data.meta["level"]
    fallback = corpus in params.discount_fallback
    prune = params.prune_args(order)
    started = time.perf_counter()
    temp_dir = os.path.expanduser(params.temp_dir) if params.temp_dir else None
    with tempfile.TemporaryDirectory(prefix="ngram-", dir=temp_dir) as tmp_name:
        tmp = Path(tmp_name)
        text, arpa = tmp / "train.txt", tmp / "model.arpa"
        write_training_text(data, text)
        print(f"{corpus} {ngram_name(order)}: lmplz -o {order} {' '.join(prune)}".rstrip())
        estimate_arpa(corpus, text, arpa, order, params.memory, fallback, tmp, prune)
        counts = arpa_counts(arpa)
        # a trie is sorted on disk like lmplz's n-grams: the same memory and folder
        sort_args = ["-S", params.memory, "-T", f"{tmp}/"] if params.binary != "probing" else []
        with atomic_path(model_path) as tmp_model:
            done = subprocess.run([str(tool_path("build_binary")), *sort_args,
                                   *BINARY_ARGS[params.binary], str(arpa), str(tmp_model)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise NgramError(f"build_binary failed (exit {done.returncode}): "
                                 f"{done.stderr.strip()[-2000:]}")
    build_seconds = time.perf_counter() - started
    model = kenlm.Model(str(model_path))
    metrics: dict = {
        "corpus": corpus,
        "model": ngram_name(order),
        "family": "ngram",
        "description": f"interpolated modified Kneser-Ney {order}-gram (KenLM lmplz)"
                       + (f", pruned ({' '.join(prune[1:])})" if prune else "")
                       + (", 8-bit quantized" if params.binary == "trie-q8" else ""),
        "level": level,
        "order": order,
        "size": sum(counts.values()),
        "size_unit": "n-grams",
        "ngram_counts": {str(k): v for k, v in sorted(counts.items())},
        "discount_fallback": fallback,
        "prune": [int(t) for t in prune[1:]],  # lmplz --prune thresholds; [] = none
        "binary": params.binary,
        "train_seconds": round(build_seconds, 2),
        "device": "cpu",
        "scoring": "per sentence from KenLM's <s> context; </s> = <eos>",
        "vocab_size": data.meta["vocab_size"],
        "vocab_digest": data.vocabulary().digest(),
        "kenlm_version": KENLM_VERSION,
    }
    for split in EVAL_SPLITS:
        score = score_split(model, data, split)
        metrics.update(score.metrics(split, level))
    return metrics
