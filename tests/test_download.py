"""Downloads: verified, atomic, mirror first, clear errors offline or on bad bytes."""

from __future__ import annotations

import shutil
import zipfile

import pytest

from pipeline import fetch as dl
from pipeline.fetch import DownloadError, download_corpus
from tests.conftest import download_params


def copy_mirror(mirror, tmp_path, *names):
    fake = tmp_path / "mirror"
    for name in names:
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mirror / name, fake / name)
    return fake


def nothing_left(folder):
    return not folder.exists() and not list(folder.parent.glob(".tmp-*"))


def unreachable_urls(monkeypatch):
    """Point the registry at a closed local port: a real, immediate connection error."""
    real_fetch = dl._fetch_url

    def fail(url, dest):
        return real_fetch("http://127.0.0.1:9/" + url.rsplit("/", 1)[-1], dest)
    monkeypatch.setattr(dl, "_fetch_url", fail)


def test_checksum_mismatch_leaves_nothing(mirror, tmp_path, no_mirror):
    fake = copy_mirror(mirror, tmp_path, *(f"ptb/ptb.{s}.txt" for s in ("train", "valid", "test")))
    with open(fake / "ptb/ptb.valid.txt", "a") as f:
        f.write("one extra line\n")
    out = tmp_path / "raw" / "ptb"
    with pytest.raises(DownloadError, match="checksum mismatch for ptb.valid.txt"):
        download_corpus("ptb", out, download_params(str(fake), ""))
    assert nothing_left(out)


def test_truncated_archive_is_a_clear_error(mirror, tmp_path, no_mirror):
    fake = tmp_path / "mirror"
    fake.mkdir()
    data = (mirror / "brown.zip").read_bytes()
    (fake / "brown.zip").write_bytes(data[: len(data) // 2])
    out = tmp_path / "raw" / "brown"
    with pytest.raises(DownloadError, match="not a readable zip archive"):
        download_corpus("brown", out, download_params(str(fake), ""))
    assert nothing_left(out)


def test_repacked_archive_verifies_by_member_content(mirror, tmp_path, no_mirror):
    """A mirror may repack an archive: members are verified, not archive bytes."""
    fake = tmp_path / "mirror"
    fake.mkdir()
    with zipfile.ZipFile(mirror / "brown.zip") as src, \
            zipfile.ZipFile(fake / "brown.zip", "w", zipfile.ZIP_STORED) as dst:
        for member in sorted(src.namelist()):
            dst.writestr(member, src.read(member))
    out = download_corpus("brown", tmp_path / "raw" / "brown", download_params(str(fake), ""))
    assert len(list((out / "brown").iterdir())) == 503


def test_offline_without_mirror_names_url_and_setting(tmp_path, monkeypatch, no_mirror):
    unreachable_urls(monkeypatch)
    out = tmp_path / "raw" / "tinyshakespeare"
    with pytest.raises(DownloadError) as err:
        download_corpus("tinyshakespeare", out, download_params("", ""))
    message = str(err.value)
    assert "could not download http://127.0.0.1:9/input.txt" in message
    assert "LMB_MIRROR" in message and "download.mirror" in message
    assert nothing_left(out)


def test_mirror_missing_a_file_falls_back_then_names_both(mirror, tmp_path, monkeypatch,
                                                          no_mirror):
    unreachable_urls(monkeypatch)
    fake = copy_mirror(mirror, tmp_path, "ptb/ptb.train.txt", "ptb/ptb.valid.txt")
    out = tmp_path / "raw" / "ptb"
    with pytest.raises(DownloadError, match="has no ptb/ptb.test.txt either"):
        download_corpus("ptb", out, download_params(str(fake), ""))
    assert nothing_left(out)


def test_env_mirror_wins_and_verified_corpus_is_not_fetched_again(mirror, tmp_path,
                                                                  monkeypatch, capsys):
    fake = copy_mirror(mirror, tmp_path, "tinyshakespeare/input.txt")
    monkeypatch.setenv("LMB_MIRROR", str(fake))
    out = tmp_path / "raw" / "tinyshakespeare"
    download_corpus("tinyshakespeare", out, download_params("/nonexistent", ""))
    assert (out / "input.txt").stat().st_size == 1_115_394
    (fake / "tinyshakespeare/input.txt").unlink()  # a second fetch would now fail
    unreachable_urls(monkeypatch)
    download_corpus("tinyshakespeare", out, download_params("", ""))
    assert "already present and verified" in capsys.readouterr().out


def test_custom_corpus_folder_needs_all_splits(tmp_path):
    src = tmp_path / "mine"
    src.mkdir()
    (src / "train.txt").write_text("a b\n")
    (src / "valid.txt").write_text("a\n")
    out = tmp_path / "raw" / "custom"
    with pytest.raises(DownloadError, match="has no test.txt"):
        download_corpus("custom", out, download_params("", str(src)))
    assert nothing_left(out)
