"""Fetching one corpus into data/raw/<corpus>/, verified (the `download` stage's work,
pipeline/stages/download.py).

Order of sources: the mirror folder (env LMB_MIRROR, else params
`download.mirror`), then the canonical URL. Everything is assembled in a
temporary folder and renamed into place only after every checksum matched, so a
failed, truncated or tampered download leaves nothing that `prepare` would read.
A corpus already present and verified is not fetched again. The `synthetic`
corpus is generated (pipeline/synthetic.py) and `custom` copied from
`download.custom_path`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.corpora import (
    CUSTOM,
    CUSTOM_SINGLE_FILE,
    CUSTOM_SPLIT_FILES,
    LONGRANGE,
    SYNTHETIC,
    Corpus,
    Source,
    get_corpus,
    sha256_of,
)
from pipeline.errors import UserError
from pipeline.longrange import LongRangeParams
from pipeline.longrange import generate_corpus as generate_longrange
from pipeline.synthetic import SyntheticParams, generate_corpus

MIRROR_ENV = "LMB_MIRROR"
URL_TIMEOUT_S = 30


class DownloadError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class DownloadParams:
    mirror: str  # folder laid out like shared/corpora; "" = none (env LMB_MIRROR wins)
    custom_path: str  # the `custom` corpus: a folder with {train,valid,test}.txt, or one file
    synthetic: SyntheticParams  # the `synthetic` corpus's source and sizes
    longrange: LongRangeParams  # the `longrange` corpus's source and sizes


def repo_path(value: str) -> Path:
    """A path from params or the environment. A relative one is relative to the repository
    root: $DVC_ROOT, which DVC sets in every stage (under `dvc exp run --queue` or
    `--temp` the stage runs in a temporary copy, but DVC_ROOT still names the user's
    checkout), else the working directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(os.environ.get("DVC_ROOT") or ".").resolve() / path


def resolve_mirror(params_mirror: str) -> Path | None:
    """The mirror folder ($LMB_MIRROR, else params download.mirror), or None if neither is
    set. One that is set but is no folder is an error: never a silent download."""
    name = MIRROR_ENV if os.environ.get(MIRROR_ENV) else "download.mirror"
    value = os.environ.get(MIRROR_ENV) or params_mirror
    if not value:
        return None
    mirror = repo_path(value)
    if not mirror.is_dir():
        raise DownloadError(f"{name} {value!r}: no folder at {mirror} (a relative path is "
                            "relative to the repository root)")
    return mirror


def _fetch_url(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(dest, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}"
            ) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
            if total is not None and dest.stat().st_size != total:
                raise DownloadError(
                    f"{url}: got {dest.stat().st_size} of {total} bytes (connection cut)"
                )
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"could not download {url}: {exc}") from None


def fetch(source: Source, dest: Path, mirror: Path | None) -> str:
    """Copy `source` to `dest`, from the mirror if it has it, else from its URL.
    Returns where it came from, for the log."""
    if mirror is not None:
        candidate = mirror / source.mirror_name
        if candidate.is_file():
            shutil.copyfile(candidate, dest)
            return str(candidate)
        print(f"mirror {mirror} has no {source.mirror_name}; trying {source.url}")
    try:
        _fetch_url(source.url, dest)
    except DownloadError as exc:
        hint = (
            f"the mirror {mirror} has no {source.mirror_name} either"
            if mirror is not None
            else f"no mirror is set: point {MIRROR_ENV} (or params download.mirror) at a "
            "local folder laid out like shared/corpora"
        )
        raise DownloadError(f"{exc}; {hint}") from None
    return source.url


def _extract(archive: Path, source: Source, wanted: set[str], into: Path) -> None:
    if source.archive_md5 is not None:
        digest = hashlib.md5(archive.read_bytes()).hexdigest()
        if digest != source.archive_md5:
            raise DownloadError(
                f"{source.mirror_name}: md5 {digest} does not match the published "
                f"{source.archive_md5} (corrupt or different archive)"
            )
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/")]
            if wanted:
                missing = sorted(wanted - set(members))
                if missing:
                    raise DownloadError(
                        f"{source.mirror_name} lacks {len(missing)} expected member(s), "
                        f"e.g. {missing[0]}"
                    )
                members = [m for m in members if m in wanted]
            for member in members:
                target = into / member
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
        raise DownloadError(
            f"{source.mirror_name} is not a readable zip archive (truncated or corrupt): {exc}"
        ) from None


def verify(corpus: Corpus, folder: Path) -> None:
    """Raise DownloadError unless `folder` holds exactly the expected content."""
    for name, expected in corpus.checksums().items():
        path = folder / name
        if not path.is_file():
            raise DownloadError(f"{corpus.name}: {name} is missing")
        actual = sha256_of(path)
        if actual != expected:
            raise DownloadError(
                f"{corpus.name}: checksum mismatch for {name}: sha256 {actual}, "
                f"expected {expected} (corrupt, truncated or a different version)"
            )
    for name, expected_lines in (corpus.line_counts or {}).items():
        path = folder / name
        if not path.is_file():
            raise DownloadError(f"{corpus.name}: {name} is missing")
        with open(path, "rb") as f:
            lines = sum(1 for _ in f)
        if lines != expected_lines:
            raise DownloadError(
                f"{corpus.name}: {name} has {lines} lines, expected {expected_lines}"
            )


def download_corpus(name: str, out: Path, params: DownloadParams) -> Path:
    """Fetch and verify corpus `name` into `out`; return `out`."""
    if name == CUSTOM:
        return copy_custom(params.custom_path, out)
    if name == SYNTHETIC:
        generate_corpus(out, params.synthetic)
        return out
    if name == LONGRANGE:
        generate_longrange(out, params.longrange)
        return out
    corpus = get_corpus(name)
    if out.is_dir():
        try:
            verify(corpus, out)
            print(f"{name}: {out} already present and verified")
            return out
        except DownloadError as exc:
            print(f"{name}: {out} does not verify ({exc}); fetching it again")
    mirror = resolve_mirror(params.mirror)
    wanted = set(corpus.checksums()) | set(corpus.line_counts or {})
    with atomic_path(out, directory=True) as staging, tempfile.TemporaryDirectory() as tmp:
        for source in corpus.sources:
            fetched = Path(tmp) / Path(source.mirror_name).name
            origin = fetch(source, fetched, mirror)
            print(f"{name}: fetched {source.mirror_name} from {origin}")
            if source.archive:
                _extract(fetched, source, wanted, staging)
            else:
                shutil.move(fetched, staging / (source.saved_as or fetched.name))
        verify(corpus, staging)
    print(f"{name}: verified {len(wanted)} file(s) into {out}")
    return out


def copy_custom(custom_path: str, out: Path) -> Path:
    if not custom_path:
        raise DownloadError(
            "corpus 'custom' needs params download.custom_path: a folder with "
            "train.txt, valid.txt and test.txt, or one text file to split by ratios"
        )
    src = repo_path(custom_path)
    with atomic_path(out, directory=True) as staging:
        if src.is_file():
            shutil.copyfile(src, staging / CUSTOM_SINGLE_FILE)
        elif src.is_dir():
            for split_file in CUSTOM_SPLIT_FILES.values():
                if not (src / split_file).is_file():
                    raise DownloadError(
                        f"download.custom_path: {src} has no {split_file} "
                        f"(expected {', '.join(CUSTOM_SPLIT_FILES.values())})"
                    )
                shutil.copyfile(src / split_file, staging / split_file)
        else:
            raise DownloadError(f"download.custom_path {custom_path!r}: {src} does not exist "
                                "(a relative path is relative to the repository root)")
    return out
