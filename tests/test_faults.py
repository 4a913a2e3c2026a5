"""Faults a user or a machine causes, each a clear error naming the problem, with nothing
half-written left behind: an unknown corpus, a vocabulary past the uint16 ids, memory
running out, and an MLflow store that is unavailable or locked (the stage's own
outputs are still written). Download and data faults are in test_download.py and
test_prepare.py, bad params in test_params.py, a NaN loss in test_training.py."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import socket
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import neural, tracking
from pipeline.corpora import CORPUS_NAMES, CorpusError
from pipeline.dataset import PreparedCorpus, id_dtype
from pipeline.encoding import prepare_corpus
from pipeline.neural import OutOfMemory, train_and_score
from pipeline.presets import TrainParams
from pipeline.stages.download import main as download_main
from pipeline.stages.ngram import main as ngram_main
from tests.conftest import PREPARE_PARAMS, REPO, write_custom_splits


def test_unknown_corpus_names_the_known_ones(tmp_path, capsys):
    from pipeline.corpora import get_corpus

    with pytest.raises(CorpusError, match="unknown corpus 'ptb3'; known corpora: ptb, brown"):
        get_corpus("ptb3")
    out = tmp_path / "raw" / "ptb3"
    with pytest.raises(SystemExit) as refused:  # the stage's command line refuses it first
        download_main(["--corpus", "ptb3", "--out", str(out)])
    assert refused.value.code == 2
    assert "invalid choice: 'ptb3' (choose from 'ptb', 'brown'" in capsys.readouterr().err
    assert not out.parent.exists()


def test_vocabulary_past_uint16_gets_wider_ids_and_never_wraps(tmp_path):
    words = [f"w{i}" for i in range(70_000)]  # more types than a uint16 id can number
    text = "\n".join(" ".join(words[i : i + 10]) for i in range(0, len(words), 10)) + "\n"
    folder = write_custom_splits(tmp_path / "big", text, "w69999 w5\n", "w0 nope\n")
    meta = prepare_corpus("custom", folder, tmp_path / "prepared", PREPARE_PARAMS)
    data = PreparedCorpus(tmp_path / "prepared")
    assert meta["vocab_size"] == 70_002 and meta["dtype"] == "uint32"
    valid = np.asarray(data.ids("valid"))
    assert [data.vocabulary().tokens[i] for i in valid] == ["w69999", "w5", "<eos>"]
    assert valid[0] > np.iinfo(np.uint16).max  # would have wrapped around in uint16
    with pytest.raises(ValueError, match="vocabulary of 4,294,967,296 types does not fit"):
        id_dtype(2**32)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, mirror) -> Path:
    """The first lines of PTB, prepared."""
    root = tmp_path_factory.mktemp("small")
    splits = {}
    for split, n in (("train", 3000), ("valid", 200), ("test", 200)):
        lines = (mirror / "ptb" / f"ptb.{split}.txt").read_text().splitlines(keepends=True)
        splits[split] = "".join(lines[:n])
    folder = write_custom_splits(root / "raw", splits["train"], splits["valid"], splits["test"])
    prepare_corpus("custom", folder, root / "prepared", PREPARE_PARAMS)
    return root / "prepared"


def small_train_params(**window_changes) -> TrainParams:
    params = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    params["presets"]["quick"]["models"]["window"].update(
        {"embedding_size": 8, "hidden_size": 8, "epochs": 1, "batch_size": 20,
         **window_changes})
    params["presets"]["quick"]["corpora"] = {c: {} for c in CORPUS_NAMES}  # no changes
    params["device"] = "cpu"
    from pipeline.params import build

    return build(TrainParams, params, "train")


@contextlib.contextmanager
def address_space_limit(headroom: int):
    """This process may map at most `headroom` bytes more (RLIMIT_AS, the soft limit only,
    restored after): a larger allocation fails at once with ENOMEM, as on a machine out of
    memory, whatever the kernel's overcommit policy (under overcommit 1 the kernel itself
    would grant it, and touching it would bring in the OOM killer instead)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(re.search(r"^VmSize:\s+(\d+) kB$", Path("/proc/self/status").read_text(),
                           re.M)[1]) * 1024
    limit = mapped + headroom if hard == resource.RLIM_INFINITY else min(mapped + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_cpu_out_of_memory_suggests_a_smaller_batch(small_corpus, tmp_path):
    # the first allocation, the embedding table, is 6,000 x 2e9 floats (48 TB): refused at
    # once, before anything is filled
    params = small_train_params(embedding_size=2_000_000_000)
    with pytest.raises(OutOfMemory, match=r"cpu ran out of memory .* lower "
                                          r"train\.presets\.quick\.models\.window\.batch_size"):
        with address_space_limit(2 << 30):
            train_and_score("custom", "window", small_corpus, tmp_path / "ckpt",
                            tmp_path / "m.pt", tmp_path / "curve.json", params)
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "curve.json").exists()


def test_gpu_out_of_memory_suggests_a_smaller_batch(small_corpus, tmp_path, monkeypatch):
    """No GPU here: CUDA's own exception, raised where training would raise it."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(neural, "train_model", out_of_memory)
    with pytest.raises(OutOfMemory, match=r"lower train\.presets\.quick\.models\.window\."
                                          r"batch_size .*CUDA out of memory"):
        train_and_score("custom", "window", small_corpus, tmp_path / "ckpt", tmp_path / "m.pt",
                        tmp_path / "curve.json", small_train_params())


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    """A working directory with the repository's params.yaml; quick MLflow retries."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "RETRIES", 2)
    monkeypatch.setattr(tracking, "FIRST_DELAY_S", 0.01)
    return tmp_path


def run_ngram_stage(small_corpus: Path, out: Path) -> None:
    ngram_main(["--corpus", "custom", "--order", "2", "--data", str(small_corpus),
                "--model", str(out / "kn2.bin"), "--metrics", str(out / "kn2.json")])


def test_unavailable_store_fails_the_stage_after_writing_its_metrics(
        small_corpus, stage_dir, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on: a tracking server that is down
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # ours are the retries here
    with pytest.raises(tracking.TrackingError, match=f"MLflow store {uri} failed to open the "
                                                     "experiment after 2 tries"):
        run_ngram_stage(small_corpus, stage_dir / "out")
    assert json.loads((stage_dir / "out" / "kn2.json").read_text())["test_ppl"] > 1
    assert (stage_dir / "out" / "kn2.bin").exists()


def test_locked_store_is_retried_then_a_clear_error_and_works_once_released(
        small_corpus, stage_dir, monkeypatch):
    db = stage_dir / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    run_ngram_stage(small_corpus, stage_dir / "first")  # creates the store
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another writer holding the database
    # SQLite's own wait for a lock, 5 s by default, shortened to keep the test quick
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}?timeout=0.2")
    try:
        with pytest.raises(tracking.TrackingError, match="database is locked"):
            run_ngram_stage(small_corpus, stage_dir / "locked")
        assert (stage_dir / "locked" / "kn2.json").exists()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    run_ngram_stage(small_corpus, stage_dir / "released")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("custom").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
