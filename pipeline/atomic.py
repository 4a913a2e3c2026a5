"""Atomic file output: write beside the destination, then rename into place.

A stage interrupted half-way leaves at most a `.tmp-*` file behind, never a
truncated output that the next stage (or `dvc repro`) would take as finished.
The new content is flushed to disk (fsync) before the rename, and the rename
itself after it, so a power cut cannot leave an empty or partial file under the
final name (a file system may otherwise commit the rename before the data).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: Path | str, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success it replaces `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual modes
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        if directory and dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    """Flush `path` (a file, or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a directory (then the directory)."""
    if path.is_dir():
        for child in path.iterdir():
            _fsync_tree(child)
    _fsync(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(dest: Path | str, data: Any) -> None:
    write_text(dest, json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")
