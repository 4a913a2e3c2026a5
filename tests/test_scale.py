"""Corpora bigger than memory (issue 13, item 4): streaming prepare equals the in-memory
definition and its memory does not grow with the corpus; KenLM's memory, temporary
folder, pruning and trie options; WikiText-103's archive layout. The 20M-token test
(peak memory of prepare and lmplz, on-disk sorting) runs only with LMB_SCALE_TESTS=1."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.scale import generate_corpus, measure_lmplz, measure_prepare
from pipeline import corpora, encoding
from pipeline.corpora import SPLITS, CorpusError, read_utf8, stream_text_lines
from pipeline.dataset import EOS, UNK, PreparedCorpus
from pipeline.encoding import CustomCorpusParams, PrepareParams, prepare_corpus
from pipeline.fetch import DownloadError, download_corpus
from pipeline.kneser_ney import NgramParams, build_ngram, write_training_text
from pipeline.params import ParamsError
from tests.conftest import download_params

EDGE_BREAKS = ["\r\n", "\n", "\r", "\x0c", "\u2028", "\x85", "\n\n", "\n \t\n", "\x1c", "\v"]


def edge_text(lines: int) -> str:
    """Every line break `str.splitlines` knows, blank and whitespace-only lines, multi-byte
    characters, tabs, and literal <unk> / <eos> tokens."""
    parts = []
    for i in range(lines):
        parts.append(f"w{i % 37} x{i % 11}\tcafé <unk> ✓{(i * 7) % 53}")
        parts.append(EDGE_BREAKS[i % len(EDGE_BREAKS)])
        if i % 13 == 0:
            parts.append("<eos> lone\u2029z\r\n")
    return "".join(parts)


# --- the streaming reader: exactly str.splitlines of the whole file -----------------------
@pytest.mark.parametrize("block", [1, 2, 3, 5, 64, None])
def test_stream_text_lines_equals_splitlines_of_the_whole_file(tmp_path, block):
    path = tmp_path / "t.txt"
    path.write_bytes(codecs.BOM_UTF8 + edge_text(300).encode() + b"last line, no break\r")
    assert list(stream_text_lines(path, block)) == read_utf8(path).splitlines()
    path.write_bytes(b"")
    assert list(stream_text_lines(path, block)) == []


@pytest.mark.parametrize("block", [1, 4, None])
@pytest.mark.parametrize("bom", [False, True])
def test_stream_names_the_byte_that_is_not_utf8(tmp_path, block, bom):
    path = tmp_path / "bad.txt"
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + "héllo\nwörld ".encode() + b"\xff z")
    with pytest.raises(CorpusError) as whole:
        read_utf8(path)
    with pytest.raises(CorpusError) as streamed:
        list(stream_text_lines(path, block))
    assert str(streamed.value) == str(whole.value)
    assert "(0xff)" in str(streamed.value)


# --- streaming prepare == the in-memory definition -------------------------------------------
def in_memory_prepare(raw: Path, level: str, ratios, min_count: int) -> dict:
    """The definition, on whole lists (prepare before streaming): split files or one
    all.txt split by ratios at line ends, blank lines skipped, vocabulary from train by
    falling count then string, <eos> after every line, OOV -> <unk>."""
    tok = str.split if level == "word" else list

    def lines_of(name):
        return [tok(line) for line in read_utf8(raw / name).splitlines()]

    if (raw / "all.txt").exists():
        lines = lines_of("all.txt")
        total = sum(len(x) + 1 for x in lines)
        bounds = [ratios[0] * total, (ratios[0] + ratios[1]) * total]
        splits = {s: [] for s in SPLITS}
        seen = 0
        for line in lines:
            splits["train" if seen < bounds[0] else "valid" if seen < bounds[1] else "test"
                   ].append(line)
            seen += len(line) + 1
    else:
        splits = {s: lines_of(f"{s}.txt") for s in SPLITS}
    skipped = {}
    for s in SPLITS:
        kept = [x for x in splits[s] if not all(t.isspace() for t in x)]
        skipped[s], splits[s] = len(splits[s]) - len(kept), kept
    counts = Counter(t for line in splits["train"] for t in line)
    vocab = [EOS, UNK, *sorted((t for t, c in counts.items()
                                if c >= min_count and t not in (EOS, UNK)),
                               key=lambda t: (-counts[t], t))]
    index = {t: i for i, t in enumerate(vocab)}
    out = {"tokens": vocab, "skipped": skipped, "oov": {}, "ids": {}}
    for s in SPLITS:
        ids = []
        for line in splits[s]:
            ids += [index.get(t, 1) for t in line] + [0]
        out["ids"][s] = np.array(ids)
        out["oov"][s] = sum(t not in index for line in splits[s] for t in line)
    return out


@pytest.mark.parametrize("level", ["word", "char"])
@pytest.mark.parametrize("layout", ["one-file", "split-files"])
def test_streaming_prepare_equals_the_in_memory_definition(tmp_path, monkeypatch, level,
                                                           layout):
    # tiny chunks and blocks: every line straddles a chunk and a block somewhere
    monkeypatch.setattr(encoding, "CHUNK_TOKENS", 7)
    monkeypatch.setattr(corpora, "READ_BLOCK", 5)
    raw = tmp_path / "raw"
    raw.mkdir()
    text = edge_text(2000)
    if layout == "one-file":
        (raw / "all.txt").write_bytes(codecs.BOM_UTF8 + text.encode())
    else:
        third = len(text) // 3
        for i, s in enumerate(SPLITS):
            (raw / f"{s}.txt").write_text(text[i * third:(i + 1) * third] + "tail")
    ratios, min_count = (0.6, 0.25, 0.15), 2
    params = PrepareParams(custom=CustomCorpusParams(level, ratios, min_count))
    meta = prepare_corpus("custom", raw, tmp_path / "out", params)
    want = in_memory_prepare(raw, level, ratios, min_count)
    data = PreparedCorpus(tmp_path / "out")
    assert meta["tokens"] == want["tokens"]
    assert meta["blank_lines_skipped_per_split"] == want["skipped"]
    assert meta["oov_per_split"] == want["oov"]
    for s in SPLITS:
        np.testing.assert_array_equal(data.ids(s), want["ids"][s])
        assert meta["tokens_per_split"][s] == len(want["ids"][s])
        # the same bytes as np.save of the whole array (the format before streaming)
        saved = tmp_path / f"{s}-saved.npy"
        np.save(saved, want["ids"][s].astype(meta["dtype"]))
        assert (data.folder / f"{s}.npy").read_bytes() == saved.read_bytes()


def test_line_chunks_are_whole_lines_whatever_the_chunk(tmp_path):
    raw = generate_corpus(tmp_path / "raw", 20_000, vocab=300, held_out=2_000)
    prepare_corpus("custom", raw, tmp_path / "out", PrepareParams(
        custom=CustomCorpusParams("word", (0.8, 0.1, 0.1), 1)))
    data = PreparedCorpus(tmp_path / "out")
    ids = np.asarray(data.ids("train"))
    eos = data.vocabulary().eos_id
    for size in (1, 3, 50, 10**6):
        pieces = list(data.line_chunks("train", size))
        assert all(p[-1] == eos for p in pieces)
        np.testing.assert_array_equal(np.concatenate(pieces), ids)
    ends = np.flatnonzero(ids == eos)
    assert [len(s) for s in data.sentences("train")] == list(np.diff(ends, prepend=-1) - 1)


def test_prepare_memory_does_not_grow_with_corpus_size(tmp_path):
    """Peak RSS of prepare in a fresh process: 4x the tokens, the same memory (the
    vocabulary, 1,000 types, is the same; a chunk and a block are all it holds)."""
    peaks = {}
    for tokens in (1_000_000, 4_000_000):
        raw = generate_corpus(tmp_path / f"raw{tokens}", tokens, vocab=1_000)
        peaks[tokens] = measure_prepare(raw, tmp_path / f"out{tokens}").peak_mb
    print(f"prepare peak RSS: {peaks}")
    assert peaks[4_000_000] < peaks[1_000_000] + 8, peaks
    assert max(peaks.values()) < PREPARE_PEAK_MB, peaks


PREPARE_PEAK_MB = 150  # measured 53-60 MB for 1M-20M tokens (Python + numpy: 34 MB)
LMPLZ_SMALL_S = "32M"  # below this, lmplz cannot hold its vocabulary hash (25 MB)
LMPLZ_PEAK_MB = 128  # measured about 40-60 MB with -S 32M


# --- the n-gram stage's scale options -----------------------------------------------------
@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale-small")
    raw = generate_corpus(root / "raw", 300_000, vocab=3_000, held_out=20_000)
    prepare_corpus("custom", raw, root / "out", PrepareParams(
        custom=CustomCorpusParams("word", (0.8, 0.1, 0.1), 1)))
    return root / "out"


def ngram_params(**changes) -> NgramParams:
    return dataclasses.replace(NgramParams(orders=(3,), discount_fallback=(), memory="200M"),
                               **changes)


SCORES = ("valid_ppl", "test_ppl", "valid_nll_nats", "test_nll_nats", "test_tokens")


def test_trie_scores_as_probing_and_quantized_trie_close(tmp_path, small_prepared):
    built = {b: build_ngram("custom", 3, small_prepared, tmp_path / f"{b}.bin",
                            ngram_params(binary=b, temp_dir=str(tmp_path)))
             for b in ("probing", "trie", "trie-q8")}
    sizes = {b: (tmp_path / f"{b}.bin").stat().st_size for b in built}
    assert {k: built["trie"][k] for k in SCORES} == {k: built["probing"][k] for k in SCORES}
    assert built["trie-q8"]["test_ppl"] == pytest.approx(built["probing"]["test_ppl"], rel=0.01)
    assert built["trie-q8"]["binary"] == "trie-q8"
    assert "quantized" in built["trie-q8"]["description"]
    assert sizes["trie-q8"] < sizes["trie"] < sizes["probing"], sizes
    assert not list(tmp_path.glob("ngram-*")), "temporary files left in temp_dir"


def test_prune_drops_rare_high_order_ngrams(tmp_path, small_prepared):
    full = build_ngram("custom", 3, small_prepared, tmp_path / "a.bin", ngram_params())
    pruned = build_ngram("custom", 3, small_prepared, tmp_path / "b.bin",
                         ngram_params(prune=(0, 0, 1)))
    assert full["prune"] == [] and pruned["prune"] == [0, 0, 1]
    assert pruned["ngram_counts"]["2"] == full["ngram_counts"]["2"]
    assert pruned["ngram_counts"]["3"] < full["ngram_counts"]["3"]
    assert "pruned" in pruned["description"] and "pruned" not in full["description"]
    # an order-2 model has nothing to prune under [0, 0, 1]: the same model as without
    assert ngram_params(prune=(0, 0, 1)).prune_args(2) == []
    assert ngram_params(prune=(0, 1)).prune_args(4) == ["--prune", "0", "1", "1", "1"]


@pytest.mark.parametrize("changes, message", [
    ({"prune": (1, 1)}, r"ngram\.prune: expected non-decreasing"),
    ({"prune": (0, 2, 1)}, r"ngram\.prune"),
    ({"binary": "hash"}, r"ngram\.binary: expected one of probing, trie, trie-q8"),
    ({"temp_dir": "/no/such/folder"}, r"ngram\.temp_dir: no folder"),
])
def test_scale_params_are_checked(changes, message):
    with pytest.raises(ParamsError, match=message):
        ngram_params(**changes).validate("ngram")


# --- WikiText-103: the documented large corpus, its archive layout ------------------------
def wikitext_zip(path: Path, lines: dict[str, list[str]]) -> Path:
    """A zip shaped like wikitext-103-v1.zip: wikitext-103/wiki.<split>.tokens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("wikitext-103/", "")
        for split, text in lines.items():
            zf.writestr(f"wikitext-103/wiki.{split}.tokens", "".join(x + "\n" for x in text))
    return path


def test_wikitext103_archive_downloads_and_prepares(tmp_path, monkeypatch):
    article = [" ", " = Valkyria Chronicles III = ", " ", " Senjō no Valkyria 3 : <unk> "
               "Chronicles ( Japanese : 戦場のヴァルキュリア3 ) is a game . ", " "]
    lines = {"train": article * 40, "valid": article[:4] * 3, "test": article[1:] * 2}
    mirror = tmp_path / "mirror"
    archive = wikitext_zip(mirror / "wikitext-103-v1.zip", lines)
    monkeypatch.setenv("LMB_MIRROR", str(mirror))  # the environment's mirror would win
    # the published MD5 and line counts are of the real archive: this one fails them ...
    with pytest.raises(DownloadError, match="md5 .* does not match the published"):
        download_corpus("wikitext103", tmp_path / "raw", download_params(str(mirror)))
    # ... and passes with its own; the member names, folder and reader are the registry's
    corpus = corpora.REGISTRY["wikitext103"]
    source = dataclasses.replace(corpus.sources[0],
                                 archive_md5=hashlib.md5(archive.read_bytes()).hexdigest())
    counts = {f"wikitext-103/wiki.{s}.tokens": len(x) for s, x in lines.items()}
    assert set(counts) == set(corpus.line_counts)
    monkeypatch.setitem(corpora.REGISTRY, "wikitext103",
                        dataclasses.replace(corpus, sources=(source,), line_counts=counts))
    raw = download_corpus("wikitext103", tmp_path / "raw", download_params(str(mirror)))
    meta = prepare_corpus("wikitext103", raw, tmp_path / "out", PrepareParams(
        custom=CustomCorpusParams("word", (0.8, 0.1, 0.1), 1)))
    # every line predicts its <eos>, blank lines too (the published token counts do)
    for s in SPLITS:
        assert meta["lines_per_split"][s] == len(lines[s])
        assert meta["tokens_per_split"][s] == sum(len(x.split()) + 1 for x in lines[s])
    assert meta["blank_lines_skipped_per_split"] == {s: 0 for s in SPLITS}
    assert meta["oov_per_split"] == {s: 0 for s in SPLITS}  # a literal <unk> is no OOV
    data = PreparedCorpus(tmp_path / "out")
    assert data.vocabulary().decode(data.ids("valid")[:7]) == "\n = Valkyria Chronicles III =\n"


# --- 20 million tokens: bounded memory, on-disk sorting --------------------------------------
SCALE_TOKENS = 20_000_000


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LMB_SCALE_TESTS") != "1",
                    reason="20M tokens, minutes: set LMB_SCALE_TESTS=1")
def test_20m_tokens_bounded_memory_and_disk_sorting_scores_the_same(tmp_path):
    started = time.perf_counter()
    raw = generate_corpus(tmp_path / "raw", SCALE_TOKENS, vocab=10_000)
    prep = measure_prepare(raw, tmp_path / "prepared")
    meta = json.loads((tmp_path / "prepared" / "vocab.json").read_text())
    skipped = meta["blank_lines_skipped_per_split"]["train"]  # a blank line: one <eos>
    assert meta["tokens_per_split"]["train"] + skipped == SCALE_TOKENS
    text = tmp_path / "train.txt"
    write_training_text(PreparedCorpus(tmp_path / "prepared"), text)
    small = measure_lmplz(text, tmp_path / "small.arpa", 3, LMPLZ_SMALL_S, tmp_path)
    ample = measure_lmplz(text, tmp_path / "ample.arpa", 3, "4G", tmp_path)
    print(f"20M tokens: prepare {prep.seconds:.0f} s, peak {prep.peak_mb:.0f} MB; lmplz -S "
          f"{LMPLZ_SMALL_S}: {small.seconds:.0f} s, peak {small.peak_mb:.0f} MB; -S 4G: "
          f"{ample.seconds:.0f} s, peak {ample.peak_mb:.0f} MB")
    assert prep.peak_mb < PREPARE_PEAK_MB
    assert small.peak_mb < LMPLZ_PEAK_MB < ample.peak_mb  # -S bounds it, and it was needed
    # sorting on disk changes nothing: the same model, byte for byte ...
    assert (tmp_path / "small.arpa").read_bytes() == (tmp_path / "ample.arpa").read_bytes()
    # ... and through the stage itself, the same scores
    scored = {s: build_ngram("custom", 3, tmp_path / "prepared", tmp_path / f"{s}.bin",
                             ngram_params(memory=s, temp_dir=str(tmp_path)))
              for s in (LMPLZ_SMALL_S, "4G")}
    assert ({k: scored[LMPLZ_SMALL_S][k] for k in SCORES}
            == {k: scored["4G"][k] for k in SCORES})
    print(f"20M-token test: {time.perf_counter() - started:.0f} s")
