"""Shared fixtures: the offline corpus mirror and prepared real corpora."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pipeline.download import DownloadParams, download_corpus
from pipeline.params import load_section
from pipeline.prepare import CustomCorpusParams, PrepareParams, prepare_corpus

REPO = Path(__file__).resolve().parents[1]


def mirror_path() -> Path:
    """The corpora mirror: $LMB_MIRROR, else a `shared/corpora` beside the checkout."""
    path = Path(os.environ.get("LMB_MIRROR") or REPO.parent / "shared" / "corpora")
    if not (path / "ptb" / "ptb.train.txt").is_file():
        pytest.fail(f"the tests need the corpora mirror; none at {path} (set LMB_MIRROR)")
    return path


@pytest.fixture(scope="session")
def mirror() -> Path:
    return mirror_path()


@pytest.fixture
def no_mirror(monkeypatch):
    monkeypatch.delenv("LMB_MIRROR", raising=False)


def download_params(mirror: str = "", custom_path: str = "", **synthetic) -> DownloadParams:
    """The repository's download params with these values (and `synthetic` changes)."""
    defaults = load_section("download", DownloadParams, REPO / "params.yaml")
    return dataclasses.replace(defaults, mirror=mirror, custom_path=custom_path,
                               synthetic=dataclasses.replace(defaults.synthetic, **synthetic))


PREPARE_PARAMS = PrepareParams(custom=CustomCorpusParams(level="word", ratios=(0.8, 0.1, 0.1),
                                                         min_count=1))


def write_custom_splits(folder: Path, train: str, valid: str, test: str) -> Path:
    """A `custom` corpus folder with the three split files."""
    folder.mkdir(parents=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text)
    return folder


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, mirror):
    """prepare(name) -> folder of the real corpus `name`, downloaded from the mirror."""
    root = tmp_path_factory.mktemp("corpora")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            raw = download_corpus(name, root / "raw" / name, download_params(str(mirror)))
            cache[name] = root / "prepared" / name
            prepare_corpus(name, raw, cache[name], PREPARE_PARAMS)
        return cache[name]

    return get
