"""Real users' text and real failures (issue 12): a custom corpus in the form a user's
editor saves it gives exactly the numbers of its plain copy; blank lines follow one rule."""

from __future__ import annotations

import codecs
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.corpora import SPLITS
from pipeline.dataset import PreparedCorpus
from pipeline.encoding import CustomCorpusParams, PrepareParams, prepare_corpus
from tests.conftest import REPO

LINES = 3_000  # of Tiny Shakespeare: about 77 kB of real text, blank lines included


@pytest.fixture(scope="module")
def shakespeare(mirror) -> list[str]:
    """The first LINES lines of real text, without their line ends."""
    text = (mirror / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return text.split("\n")[:LINES]


def params(level: str) -> PrepareParams:
    return PrepareParams(custom=CustomCorpusParams(level=level, ratios=(0.8, 0.1, 0.1),
                                                   min_count=1))


def files(lines: list[str], split_files: bool = False) -> dict[str, list[str]]:
    """A custom corpus's files: one all.txt, or train/valid/test.txt (80/10/10% of lines)."""
    if not split_files:
        return {"all": lines}
    cuts = [0, len(lines) * 8 // 10, len(lines) * 9 // 10, len(lines)]
    return {s: lines[cuts[i]:cuts[i + 1]] for i, s in enumerate(SPLITS)}


def write_corpus(folder: Path, parts: dict[str, list[str]], *, end: str = "\n",
                 bom: bool = False) -> Path:
    """The files `parts` (name -> lines) with line ends `end`, after a BOM if `bom`."""
    folder.mkdir(parents=True)
    for name, part in parts.items():
        data = "".join(line + end for line in part).encode("utf-8")
        (folder / f"{name}.txt").write_bytes((codecs.BOM_UTF8 if bom else b"") + data)
    return folder


def prepared_pair(tmp_path: Path, level: str, plain: dict[str, list[str]],
                  other: dict[str, list[str]], **saved_as) -> tuple[dict, dict]:
    """prepare() of the plain LF copy and of `other` saved as `saved_as` says; both checked
    for identical ids, and their vocab.json returned."""
    a = write_corpus(tmp_path / "lf", plain)
    b = write_corpus(tmp_path / "other", other, **saved_as)
    meta_a = prepare_corpus("custom", a, tmp_path / "out-lf", params(level))
    meta_b = prepare_corpus("custom", b, tmp_path / "out-other", params(level))
    for split in SPLITS:
        np.testing.assert_array_equal(PreparedCorpus(tmp_path / "out-lf").ids(split),
                                      PreparedCorpus(tmp_path / "out-other").ids(split))
    return meta_a, meta_b


SAME_KEYS = ("tokens", "vocab_size", "tokens_per_split", "lines_per_split", "oov_per_split",
             "train_counts")


# --- items 1 and 2: Windows line ends and a byte-order mark ------------------------------
@pytest.mark.parametrize("level", ["word", "char"])
@pytest.mark.parametrize("split_files", [False, True], ids=["one-file", "split-files"])
def test_crlf_with_bom_gives_the_counts_of_the_plain_copy(tmp_path, shakespeare, level,
                                                          split_files):
    parts = files(shakespeare, split_files)
    plain, windows = prepared_pair(tmp_path, level, parts, parts, end="\r\n", bom=True)
    assert {k: windows[k] for k in SAME_KEYS} == {k: plain[k] for k in SAME_KEYS}
    assert "\r" not in windows["tokens"] and not any("\ufeff" in t for t in windows["tokens"])
    assert plain["tokens_per_split"]["train"] > (50_000 if level == "char" else 10_000)


def test_bom_is_not_part_of_the_first_word(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "all.txt").write_bytes(codecs.BOM_UTF8 + b"First Citizen:\nFirst Citizen:\n" * 5)
    meta = prepare_corpus("custom", raw, tmp_path / "out", params("word"))
    assert meta["train_counts"][meta["tokens"].index("First")] == 8  # 10 lines, 80% train
    assert "\ufeffFirst" not in meta["tokens"]


def test_a_bad_byte_after_a_bom_is_named_at_its_offset_in_the_file(tmp_path):
    from pipeline.corpora import CorpusError

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "all.txt").write_bytes(codecs.BOM_UTF8 + b"good line\nbad \xff byte\n")
    with pytest.raises(CorpusError, match=r"all.txt: byte 17 \(0xff\) is not valid UTF-8"):
        prepare_corpus("custom", raw, tmp_path / "out", params("word"))


# --- item 3: the same line breaks at every level ------------------------------------------
@pytest.mark.parametrize("level", ["word", "char"])
@pytest.mark.parametrize("end", ["\r", "\f", "\x85", "\u2028", "\u2029", "\v"])
def test_every_line_break_ends_a_line_at_every_level(tmp_path, shakespeare, level, end):
    parts = files(shakespeare)
    plain, other = prepared_pair(tmp_path, level, parts, parts, end=end)
    assert {k: other[k] for k in SAME_KEYS} == {k: plain[k] for k in SAME_KEYS}
    assert end not in other["tokens"]


# --- item 4: blank lines, one rule ---------------------------------------------------------
@pytest.mark.parametrize("level", ["word", "char"])
def test_blank_lines_are_skipped_and_counted(tmp_path, shakespeare, level):
    # real text's own blank lines, every other one made of spaces and a tab
    blanked = files([" \t" if not line and i % 2 else line
                     for i, line in enumerate(shakespeare)], split_files=True)
    text = {s: [line for line in lines if line.strip()] for s, lines in blanked.items()}
    plain, blank = prepared_pair(tmp_path, level, text, blanked)
    assert {k: blank[k] for k in SAME_KEYS} == {k: plain[k] for k in SAME_KEYS}
    expected = {s: len(blanked[s]) - len(text[s]) for s in SPLITS}
    assert blank["blank_lines_skipped_per_split"] == expected
    assert sum(expected.values()) > 400  # Tiny Shakespeare's speeches are parted by them
    assert plain["blank_lines_skipped_per_split"] == dict.fromkeys(SPLITS, 0)
    saved = PreparedCorpus(tmp_path / "out-other").meta["blank_lines_skipped_per_split"]
    assert saved == expected  # recorded in vocab.json


def test_builtin_corpora_record_their_blank_lines(prepared):
    """Brown's blank lines are skipped by the shared rule (counts as published, see
    tests/test_prepare.py); Tiny Shakespeare keeps its newlines as characters."""
    brown = PreparedCorpus(prepared("brown")).meta
    assert brown["blank_lines_skipped_per_split"] == {"train": 20_077, "valid": 6_079,
                                                      "test": 5_833}
    assert brown["tokens_per_split"] == {"train": 835_524, "valid": 211_711, "test": 171_297}
    shakespeare = PreparedCorpus(prepared("tinyshakespeare")).meta
    assert shakespeare["blank_lines_skipped_per_split"] == dict.fromkeys(SPLITS, 0)
    assert shakespeare["tokens_per_split"] == {"train": 1_003_856, "valid": 55_780,
                                               "test": 55_758}


def test_only_corpora_with_published_blank_line_scoring_keep_them():
    from pipeline.corpora import REGISTRY

    keep = {name for name, corpus in REGISTRY.items() if corpus.keep_blank_lines}
    assert keep == {"tinyshakespeare", "wikitext2", "wikitext103"}


# --- item 7: a damaged checkpoint is moved aside, and training starts over ----------------
@pytest.fixture(scope="module")
def ptb_small(tmp_path_factory, mirror) -> Path:
    """The first 120 / 20 / 20 lines of real PTB text, prepared as a custom corpus."""
    root = tmp_path_factory.mktemp("ptb-small")
    parts = {s: (mirror / "ptb" / f"ptb.{s}.txt").read_text().splitlines()[:n]
             for s, n in (("train", 120), ("valid", 20), ("test", 20))}
    prepare_corpus("custom", write_corpus(root / "raw", parts), root / "out", params("word"))
    return root / "out"


@pytest.fixture(scope="module")
def ptb_ids(ptb_small) -> dict[str, np.ndarray]:
    data = PreparedCorpus(ptb_small)
    return {s: np.asarray(data.ids(s)) for s in SPLITS} | {"vocab": len(data.vocabulary())}


def train_small(ids: dict, folder: Path) -> dict:
    import torch  # a pinned dependency: no skip (the training imports it anyway)

    from pipeline.model_spec import ModelSpec
    from pipeline.networks import NetworkConfig
    from pipeline.schedule import TrainConfig
    from pipeline.training import Runtime, Splits, train_model

    torch.set_num_threads(1)
    network = NetworkConfig(kind="lstm", vocab_size=ids["vocab"], embedding_size=16,
                            hidden_size=16, context=3, dropout=0.0, tie_weights=False,
                            direct_connections=False, init_range=0.1)
    cfg = TrainConfig(batch_size=4, bptt=10, epochs=2, max_tokens=0, evals_per_epoch=1,
                      optimizer="adam", lr=0.01, loss="token_mean", schedule="decay",
                      lr_decay=1.2, decay_after=1, plateau_threshold=0.0,
                      stop_after_plateaus=0, warmup=0.0, lr_min=0.0, clip=5.0, seed=0)
    result = train_model(ModelSpec(network=network, training=cfg),
                         Splits(train=ids["train"], valid=ids["valid"], eos_id=0),
                         Runtime(checkpoint_dir=folder))
    return {"valid_ppl": [h["valid_ppl"] for h in result["history"]],
            "best": result["best_valid_ppl"]}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["last.pt", "best.pt"])
def test_a_truncated_checkpoint_is_moved_aside_and_training_starts_over(tmp_path, ptb_ids,
                                                                       damaged, capsys):
    first = train_small(ptb_ids, tmp_path)
    truncate(tmp_path / damaged)
    capsys.readouterr()
    again = train_small(ptb_ids, tmp_path)  # a finished run, had it not been damaged
    said = capsys.readouterr().out
    assert f"checkpoint {tmp_path / damaged} is truncated or corrupt" in said
    assert f"moved it to {tmp_path / damaged}.corrupt: training from scratch" in said
    assert (tmp_path / f"{damaged}.corrupt").is_file()
    assert again == first  # trained again from the start, to the same numbers
    from pipeline.checkpoints import load_checkpoint, load_model

    load_checkpoint(tmp_path / "last.pt")
    load_model(tmp_path / "best.pt")


def test_a_corrupt_published_model_names_the_file(tmp_path, ptb_ids):
    from pipeline.checkpoints import CheckpointError, load_model

    train_small(ptb_ids, tmp_path)
    model = tmp_path / "lstm.pt"  # as the sample stage reads models/<corpus>/<model>.pt
    data = bytearray((tmp_path / "best.pt").read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit, inside the weights
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint {model} is truncated or corrupt "
                       r"\(member .* fails its CRC check\); moved it to .*lstm.pt.corrupt"):
        load_model(model)
    assert not model.exists() and (tmp_path / "lstm.pt.corrupt").exists()


def test_atomic_outputs_are_synced_before_the_rename(tmp_path, monkeypatch):
    import os

    from pipeline import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (
        events.append(("replace", str(a))), real_replace(a, b)))
    atomic.write_text(tmp_path / "out.txt", "numbers\n")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1] == events[1][1]  # the temporary file itself, before it is renamed
    assert events[2][1] == str(tmp_path)  # then the directory entry
    events.clear()
    with atomic.atomic_path(tmp_path / "folder", directory=True) as staging:
        (staging / "a.npy").write_bytes(b"ids")
    synced = [path for kind, path in events if kind == "fsync"]
    assert synced[:2] == [str(staging / "a.npy"), str(staging)]
    assert (tmp_path / "folder" / "a.npy").read_bytes() == b"ids"


# --- item 8: another vocabulary with the same ids retrains, never resumes ---------------------
def test_a_vocabulary_change_that_keeps_the_ids_retrains_the_model(ptb_small, tmp_path, capsys):
    import json

    from pipeline import neural
    from tests.test_faults import small_train_params

    data = tmp_path / "data"
    shutil.copytree(ptb_small, data)
    stage = dict(corpus="custom", model="window", data_dir=data, checkpoints=tmp_path / "ckpt",
                 out=tmp_path / "m.pt", curve=tmp_path / "curve.json",
                 params=small_train_params())
    first = neural.train_and_score(**stage)
    vocab = json.loads((data / "vocab.json").read_text())
    vocab["tokens"][5] += "-renamed"  # the same ids, another vocabulary
    (data / "vocab.json").write_text(json.dumps(vocab))
    capsys.readouterr()
    second = neural.train_and_score(**stage)  # before the fix: "trained on another vocabulary"
    said = capsys.readouterr().out
    assert "resuming from" not in said and "training from scratch" in said
    assert second["vocab_digest"] != first["vocab_digest"]
    assert second["valid_ppl"] == first["valid_ppl"]  # same ids, same model, trained again


def test_the_published_valid_score_is_the_scorer_on_the_published_model(ptb_small, tmp_path,
                                                                        monkeypatch):
    """The train stage publishes the valid score its validation point measured when it chose
    best.pt (not scoring the split twice): exactly what the one scorer gives that model
    under the same setup. Under another setup (here another chunk) it scores again."""
    from pipeline import neural
    from pipeline.checkpoints import load_model
    from pipeline.perplexity import score_stream
    from tests.test_faults import small_train_params

    scored = []  # the splits the stage scores itself, after training
    monkeypatch.setattr(neural, "score_stream", lambda model, ids, *args: (
        scored.append(len(ids)), score_stream(model, ids, *args))[1])
    valid = PreparedCorpus(ptb_small).ids("valid")
    keys = ("valid_ppl", "valid_nll_nats", "valid_tokens")
    params = small_train_params(epochs=2)  # two validation points: best.pt may be either
    stage = dict(corpus="custom", model="window", data_dir=ptb_small,
                 checkpoints=tmp_path / "ckpt", out=tmp_path / "m.pt",
                 curve=tmp_path / "curve.json")
    metrics = neural.train_and_score(**stage, params=params)
    assert len(scored) == 1 and scored[0] != len(valid)  # test only
    fresh = score_stream(load_model(tmp_path / "m.pt"), valid, params.eval_chunk, 0)
    assert {k: metrics[k] for k in keys} == fresh.metrics("valid", "word")
    scored.clear()
    other = dataclasses.replace(params, eval_chunk=7)  # the finished run, found again
    again = neural.train_and_score(**stage, params=other)
    assert len(scored) == 2  # valid and test
    rescored = score_stream(load_model(tmp_path / "m.pt"), valid, 7, 0)
    assert {k: again[k] for k in keys} == rescored.metrics("valid", "word")
    assert again["valid_ppl"] == pytest.approx(metrics["valid_ppl"], rel=1e-5)


# --- item 9: an expected error is one line, a bug keeps its traceback ------------------------
def run_module(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_a_corrupted_mirror_file_is_one_clear_line(tmp_path, mirror):
    bad = tmp_path / "mirror"
    shutil.copytree(mirror / "ptb", bad / "ptb")
    with open(bad / "ptb" / "ptb.valid.txt", "a") as f:
        f.write("a line too many\n")
    done = run_module(["pipeline.stages.download", "--corpus", "ptb", "--out",
                       str(tmp_path / "raw")], {"LMB_MIRROR": str(bad)})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ptb: checksum mismatch for ptb.valid.txt: sha256 ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "raw").exists()


def test_a_bad_params_value_is_one_clear_line():
    done = run_module(["pipeline.presets", "show", "ptb", "lstm7"], {})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: unknown model 'lstm7'; known: ")


@pytest.mark.parametrize("args, starts", [
    # a folder with no prepared corpus (a fresh clone before `dvc pull`)
    (["pipeline.stages.ngram", "--corpus", "ptb", "--order", "2", "--data", "/nonexistent",
      "--model", "m", "--metrics", "m.json"], "error: /nonexistent: no prepared corpus "),
    # a corpus not downloaded
    (["pipeline.stages.prepare", "--corpus", "ptb", "--raw", "/nonexistent", "--out", "out"],
     "error: /nonexistent/ptb.train.txt: no such file; download the corpus first"),
    # a corpus params.yaml does not list
    (["pipeline.stages.sample", "--corpus", "wikitext2", "--data", "d", "--models", "m", "--out",
      "o.md", "--out-json", "o.json"], "error: corpora: 'wikitext2' is not listed in "),
    # a model not trained yet
    (["pipeline.stages.analyse", "--corpus", "synthetic", "--data", "{synthetic}", "--models",
      "/nonexistent", "--out", "out"], "error: /nonexistent/window.pt: no trained window "),
])
def test_a_missing_input_is_one_clear_line(args, starts, prepared, tmp_path):
    args = [a.format(synthetic=prepared("synthetic")) for a in args]
    shutil.copy(REPO / "params.yaml", tmp_path)  # the stage runs in tmp_path: outputs there
    done = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith(starts) and len(done.stderr.strip().splitlines()) == 1


def test_an_unknown_corpus_name_is_refused_by_every_stage():
    for stage in ("download", "prepare", "ngram", "train", "sample", "analyse"):
        done = run_module([f"pipeline.stages.{stage}", "--corpus", "ptbx"], {})
        assert done.returncode == 2, stage  # argparse: the usage, then the one error line
        assert "argument --corpus: invalid choice: 'ptbx'" in done.stderr.splitlines()[-1]


def test_a_bug_keeps_its_traceback():
    from pipeline.errors import UserError, run_stage

    def buggy():
        return {}["key"]

    with pytest.raises(KeyError):
        run_stage(buggy)

    def expected():
        raise UserError("download.custom_path: /nowhere does not exist")

    with pytest.raises(SystemExit) as stopped:
        run_stage(expected)
    assert stopped.value.code == 1


# --- item 5: relative paths are relative to the repository, also in DVC's temporary copies ---
@pytest.fixture
def in_temp_copy(tmp_path, monkeypatch, no_mirror) -> Path:
    """A stage as `dvc exp run --temp` runs it: in a copy, DVC_ROOT naming the checkout."""
    checkout, copy = tmp_path / "checkout", tmp_path / "copy"
    checkout.mkdir()
    copy.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(checkout))
    monkeypatch.chdir(copy)
    return checkout


def test_a_relative_custom_path_is_found_in_the_checkout(in_temp_copy, tmp_path, shakespeare):
    from pipeline.fetch import download_corpus
    from tests.conftest import download_params

    write_corpus(in_temp_copy / "mytext", files(shakespeare, split_files=True))
    out = download_corpus("custom", tmp_path / "raw", download_params(custom_path="mytext"))
    assert sorted(p.name for p in out.iterdir()) == ["test.txt", "train.txt", "valid.txt"]


def test_a_missing_relative_custom_path_names_the_path_tried(in_temp_copy, tmp_path):
    from pipeline.fetch import DownloadError, download_corpus
    from tests.conftest import download_params

    with pytest.raises(DownloadError, match=rf"download.custom_path 'mytext': {in_temp_copy}"
                       r"/mytext does not exist \(a relative path is relative to the repo"):
        download_corpus("custom", tmp_path / "raw", download_params(custom_path="mytext"))


def test_a_relative_mirror_is_found_in_the_checkout(in_temp_copy, tmp_path, mirror):
    from pipeline.fetch import download_corpus
    from tests.conftest import download_params

    (in_temp_copy / "corpora").mkdir()
    (in_temp_copy / "corpora" / "tinyshakespeare").symlink_to(mirror / "tinyshakespeare")
    out = download_corpus("tinyshakespeare", tmp_path / "raw", download_params("corpora"))
    assert (out / "input.txt").stat().st_size == 1_115_394


def test_a_mirror_that_is_no_folder_is_an_error_not_a_download(in_temp_copy, tmp_path,
                                                               monkeypatch):
    from pipeline.fetch import DownloadError, download_corpus
    from tests.conftest import download_params

    monkeypatch.setenv("LMB_MIRROR", "corpora")
    with pytest.raises(DownloadError, match=rf"LMB_MIRROR 'corpora': no folder at "
                       rf"{in_temp_copy}/corpora"):
        download_corpus("ptb", tmp_path / "raw", download_params())


# --- item 6: artifacts live beside the store, whoever creates the experiment -------------------
@pytest.mark.slow  # MLflow: a new SQLite store, about 10 s
def test_an_experiment_created_in_a_temporary_copy_keeps_its_artifacts_beside_the_store(
        tmp_path, monkeypatch):
    from pipeline import tracking

    store, worker = tmp_path / "checkout", tmp_path / "worker-copy"
    store.mkdir()
    worker.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(worker)  # where a queue worker runs; DVC deletes it afterwards
    (worker / "metrics.json").write_text('{"test_ppl": 141.2}\n')
    with tracking.model_run("mycorpus", "kn5", "ngram", "ngram@mycorpus-5", {}) as run:
        run.log_artifact(worker / "metrics.json")
    import mlflow

    experiment = mlflow.get_experiment_by_name("mycorpus")
    assert experiment.artifact_location == (store / "mlruns" / "mycorpus").as_uri()
    saved = list((store / "mlruns" / "mycorpus").rglob("metrics.json"))
    assert len(saved) == 1 and saved[0].read_text() == '{"test_ppl": 141.2}\n'
    assert not (worker / "mlruns").exists()


# --- item 10: `dvc exp run` with the virtual environment -------------------------------------
def test_make_exp_runs_dvc_exp_run_with_the_venv_first_on_path():
    # as a top-level make would: under `make test` the inherited MAKELEVEL makes make
    # print "Entering/Leaving directory" lines around the commands
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(["make", "--no-print-directory", "-n", "exp",
                           "ARGS=-S train.preset=small"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip().splitlines()[-1]
    assert command == (f'PATH="{REPO}/.venv/bin:$PATH" .venv/bin/dvc exp run '
                       "-S train.preset=small")


# --- item 11: the smaller ones --------------------------------------------------------------
def test_an_out_of_vocabulary_prompt_is_a_warning_showing_what_is_used(ptb_small, capsys):
    from pipeline.sampling import encode_prompt

    vocab = PreparedCorpus(ptb_small).vocabulary()
    ids = encode_prompt("the zyzzyva market", vocab)
    assert [vocab.tokens[i] for i in ids] == ["the", "<unk>", "market"]
    assert capsys.readouterr().err == ("warning: sample.prompt: 'zyzzyva' not in the "
                                       "vocabulary; the models continue 'the <unk> market'\n")
    encode_prompt("the market", vocab)
    assert capsys.readouterr().err == ""


def test_an_infinite_temperature_is_refused():
    import yaml

    from pipeline.params import ParamsError, build
    from pipeline.sampling import SampleParams

    section = yaml.safe_load((REPO / "params.yaml").read_text())["sample"]
    section["temperature"] = yaml.safe_load(".inf")
    with pytest.raises(ParamsError, match="sample.temperature: expected a finite number, "
                                          "got inf"):
        build(SampleParams, section, "sample")


def test_a_train_split_shorter_than_a_batch_names_the_key(tmp_path, mirror):
    from pipeline.neural import train_and_score
    from pipeline.params import ParamsError
    from tests.test_faults import small_train_params

    words = (mirror / "ptb" / "ptb.train.txt").read_text().split()
    parts = {"train": [" ".join(words[:9])], "valid": [" ".join(words[:5])],
             "test": [" ".join(words[5:9])]}
    prepare_corpus("custom", write_corpus(tmp_path / "raw", parts), tmp_path / "data",
                   params("word"))
    with pytest.raises(ParamsError, match=r"train\.presets\.quick\.models\.window\.batch_size: "
                       r"20 columns need at least 21 training tokens, custom's train split "
                       r"has 10"):
        train_and_score("custom", "window", tmp_path / "data", tmp_path / "ckpt",
                        tmp_path / "m.pt", tmp_path / "curve.json", small_train_params())


def cuda_out_of_memory(*args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("where", ["validation", "final scores"])
def test_out_of_memory_while_scoring_names_eval_chunk(ptb_small, tmp_path, monkeypatch, where):
    from pipeline import neural, training
    from pipeline.neural import OutOfMemory
    from tests.test_faults import small_train_params

    target = (training, "stream_nll") if where == "validation" else (neural, "score_stream")
    monkeypatch.setattr(*target, cuda_out_of_memory)
    with pytest.raises(OutOfMemory, match=r"cpu ran out of memory scoring custom/window with "
                       r"eval_chunk \d+: lower train\.eval_chunk .*CUDA out of memory"):
        neural.train_and_score("custom", "window", ptb_small, tmp_path / "ckpt",
                              tmp_path / "m.pt", tmp_path / "curve.json", small_train_params())


@pytest.mark.parametrize("stamp", [None, "0.2.0"])
def test_kenlm_tools_of_another_version_are_refused(tmp_path, monkeypatch, stamp):
    from pipeline.kenlm_tools import KENLM_VERSION, KenLMToolsMissing, tool_path

    (tmp_path / "bin").mkdir()
    for tool in ("lmplz", "build_binary"):
        (tmp_path / "bin" / tool).write_text("#!/bin/sh\n")
        (tmp_path / "bin" / tool).chmod(0o755)
    if stamp:
        (tmp_path / "bin" / "KENLM_VERSION").write_text(stamp + "\n")
    monkeypatch.setenv("LMB_KENLM_DIR", str(tmp_path))
    built = f"KenLM {stamp}" if stamp else "of unknown version (no bin/KENLM_VERSION)"
    with pytest.raises(KenLMToolsMissing, match=rf"LMB_KENLM_DIR {tmp_path}: its tools are "
                       rf"{re.escape(built)}, the scoring module is KenLM {KENLM_VERSION}"):
        tool_path("lmplz")
    (tmp_path / "bin" / "KENLM_VERSION").write_text(KENLM_VERSION + "\n")
    assert tool_path("lmplz") == tmp_path / "bin" / "lmplz"
