"""KenLM's command-line tools: where they live, and how they are built once.

The `kenlm` package on PyPI (an sdist) compiles only the Python scoring module.
The estimator `lmplz` and the converter `build_binary` are compiled here from the
very same sdist, so that estimation and scoring come from one KenLM version.
The build is cached per machine (about a minute on 2 cores) and reused by every
checkout and every run.

    python -m pipeline.kenlm_tools          # build if missing, print the bin folder

Location: $LMB_KENLM_DIR, else ~/.cache/lm-baselines/kenlm-<version>. A build
stamps its version in bin/KENLM_VERSION; tools of another (or an unknown) version
in $LMB_KENLM_DIR are refused, so estimation and scoring never mix versions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pipeline.errors import UserError, run_stage

KENLM_VERSION = "0.3.0"
TOOLS = ("lmplz", "build_binary")
VERSION_FILE = "KENLM_VERSION"  # in bin/, written by build(): the version of the tools


class KenLMToolsMissing(UserError, RuntimeError):
    pass


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "lm-baselines" / f"kenlm-{KENLM_VERSION}"
    return Path(os.environ.get("LMB_KENLM_DIR", default))


def tool_path(name: str) -> Path:
    """Absolute path of a built KenLM tool, or a clear error saying how to build it."""
    if name not in TOOLS:
        raise ValueError(f"unknown KenLM tool {name!r}; expected one of {TOOLS}")
    path = cache_dir() / "bin" / name
    if not os.access(path, os.X_OK):
        raise KenLMToolsMissing(
            f"KenLM's {name} was not found at {path}. Build it once with "
            "`make kenlm` (or `python -m pipeline.kenlm_tools`); set LMB_KENLM_DIR "
            "to use another build folder."
        )
    version = built_version()
    if version != KENLM_VERSION:
        built = f"KenLM {version}" if version else f"of unknown version (no bin/{VERSION_FILE})"
        raise KenLMToolsMissing(
            f"LMB_KENLM_DIR {cache_dir()}: its tools are {built}, the scoring module is "
            f"KenLM {KENLM_VERSION}; rebuild them there with `make kenlm`, or unset "
            "LMB_KENLM_DIR")
    return path


def built_version() -> str | None:
    """The KenLM version the tools in cache_dir() were built from: their stamp, else (for
    the default folder, named after the version) KENLM_VERSION; None if unknown."""
    stamp = cache_dir() / "bin" / VERSION_FILE
    if stamp.is_file():
        return stamp.read_text(encoding="utf-8").strip()
    return None if os.environ.get("LMB_KENLM_DIR") else KENLM_VERSION


def is_built() -> bool:
    return (all(os.access(cache_dir() / "bin" / t, os.X_OK) for t in TOOLS)
            and built_version() == KENLM_VERSION)


def _quiet(cmd: list[str], cwd: Path) -> None:
    """Run a build step; its (warning-heavy) output is shown only if it fails."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise KenLMToolsMissing(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}"
                                f"\n{result.stderr[-3000:]}")


def build(jobs: int | None = None) -> Path:
    """Compile lmplz and build_binary from the kenlm sdist into cache_dir()/bin."""
    bin_dir = cache_dir() / "bin"
    if is_built():
        return bin_dir
    for exe in ("cmake", "make", "c++"):
        if shutil.which(exe) is None:
            raise KenLMToolsMissing(f"building KenLM needs `{exe}` on PATH")
    if not Path("/usr/include/boost/program_options.hpp").exists():
        raise KenLMToolsMissing(
            "building KenLM needs Boost, zlib, bz2 and lzma headers: run `make system-deps` "
            "as root (the Makefile lists the Debian packages)"
        )
    jobs = jobs or os.cpu_count() or 1
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kenlm-build-", dir=bin_dir.parent) as tmp:
        work = Path(tmp)
        subprocess.run(
            # --no-binary for kenlm alone: its build requirements (cmake, ...) may come
            # as wheels; ":all:" would compile CMake from source (minutes)
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", "kenlm", f"kenlm=={KENLM_VERSION}", "-d", str(work)],
            check=True,
        )
        (sdist,) = work.glob("kenlm-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        source = work / f"kenlm-{KENLM_VERSION}"
        build_dir = source / "build"
        build_dir.mkdir()
        # KENLM_MAX_ORDER=6 matches the Python module's default, so every binary
        # that build_binary writes can be loaded by `kenlm.Model`.
        print(f"building KenLM {KENLM_VERSION}'s {' and '.join(TOOLS)} (about a minute)")
        _quiet(["cmake", "..", "-DCMAKE_BUILD_TYPE=Release", "-DKENLM_MAX_ORDER=6"], build_dir)
        _quiet(["make", f"-j{jobs}", *TOOLS], build_dir)
        staged = work / "bin"
        staged.mkdir()
        for tool in TOOLS:
            shutil.copy2(build_dir / "bin" / tool, staged / tool)
        (staged / VERSION_FILE).write_text(KENLM_VERSION + "\n", encoding="utf-8")
        # Rename into place last: a half-finished build never looks finished.
        if bin_dir.exists():
            shutil.rmtree(bin_dir)
        staged.rename(bin_dir)
    return bin_dir


def main() -> None:
    print(build())


if __name__ == "__main__":
    run_stage(main)
