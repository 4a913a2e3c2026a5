"""The regression check: the whole pipeline on a small configuration, against a baseline.

    python -m tests.regression            # run, compare, print what moved (exit 1 if anything)
    python -m tests.regression --update   # run and write the baseline on purpose
                                          # (= make regression-baseline; commit the result)

`dvc repro` runs in a temporary copy of the repository with tests/regression.yaml
merged over params.yaml: the synthetic corpus (100k training tokens) and the first
lines of PTB from the mirror (as a `custom` corpus), KN 2- and 3-grams and every
neural model kind, small, for 2 epochs, on one CPU thread, so every number is
deterministic. Every model's metrics file is then compared with
tests/regression_baseline.json:

    token counts, vocabulary size, epochs    exactly
    n-gram perplexities                      within TOLERANCE["ngram"] (relative)
    neural perplexities                      within TOLERANCE["neural"] (relative)
    the synthetic corpus's floor             within TOLERANCE["floor"] (relative)

plus one check that needs no baseline: the KN 3-gram on the synthetic corpus
stays within MAX_OVER_FLOOR of the source's entropy floor. A stage that fails
leaves its rows missing, and they are reported as such beside what moved.
tests/test_regression.py runs this in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from tabulate import tabulate

from pipeline.lineup import configured_models

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "regression.yaml"
BASELINE = REPO / "tests" / "regression_baseline.json"
BIN = Path(sys.executable).parent
PTB_SLICE_LINES = {"train": 4000, "valid": 400, "test": 400}
TOLERANCE = {"ngram": 1e-4, "neural": 0.01, "floor": 1e-9}
EXACT = ("valid_tokens", "test_tokens", "vocab_size", "epochs")
MAX_OVER_FLOOR = 1.15  # synthetic kn3 test ppl / floor (measured 1.09 at 100k train tokens)


def merge(base: dict, overlay: dict) -> dict:
    """`overlay` over `base`, mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_workspace(root: Path, mirror: Path) -> tuple[Path, dict]:
    """A git-initialised copy of the repository under root/repo, configured for the
    regression; returns it and the environment to run DVC in."""
    repo = root / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        # dvc.lock describes the full pipeline, not this one
        if (REPO / name).is_file() and name != "dvc.lock":
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    corpus = root / "ptb-slice"
    corpus.mkdir()
    for split, n in PTB_SLICE_LINES.items():
        lines = (mirror / "ptb" / f"ptb.{split}.txt").read_text().splitlines(keepends=True)
        (corpus / f"{split}.txt").write_text("".join(lines[:n]))
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()),
                   yaml.safe_load(CONFIG.read_text()))
    params["download"]["custom_path"] = str(corpus)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DVC_", "MLFLOW_", "LMB_"))}
    env.update(PATH=f"{BIN}:{env['PATH']}", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # same numbers on any core count
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo, env


def repro(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`dvc repro --keep-going`: a failing stage still lets the others produce metrics."""
    return subprocess.run([str(BIN / "dvc"), "repro", "--keep-going", *args], cwd=repo,
                          env=env, capture_output=True, text=True)


def collect(repo: Path) -> dict[str, dict]:
    """corpus/model -> the compared values, from each model's metrics file (written even
    when a later stage fails), plus corpus/floor for a corpus with a known source."""
    values: dict[str, dict] = {}
    for corpus, models in configured_models(repo / "params.yaml").items():
        for model in models:
            path = repo / "reports" / "metrics" / corpus / f"{model}.json"
            if path.exists():
                metrics = json.loads(path.read_text())
                values[f"{corpus}/{model}"] = {
                    "family": metrics["family"],
                    **{k: metrics[k] for k in ("valid_ppl", "test_ppl", *EXACT) if k in metrics}}
        vocab = repo / "data" / "prepared" / corpus / "vocab.json"
        source = json.loads(vocab.read_text()).get("source") if vocab.exists() else None
        if source:
            values[f"{corpus}/floor"] = {"family": "floor", "floor_ppl": source["floor_ppl"]}
    return values


@dataclass(frozen=True)
class Moved:
    row: str
    value: str
    baseline: float | str | None
    now: float | str | None
    allowed: str

    def cells(self) -> list:
        change = ""
        numbers = all(isinstance(v, int | float) for v in (self.baseline, self.now))
        if numbers and self.baseline != 0:
            change = f"{100 * (self.now - self.baseline) / self.baseline:+.2f}%"
        return [self.row, self.value, _show(self.baseline), _show(self.now), change,
                self.allowed]


def _show(value) -> str:
    if value is None:
        return "missing"
    if isinstance(value, str):
        return value
    return f"{value:,.4f}" if isinstance(value, float) else f"{value:,}"


def compare(now: dict[str, dict], baseline: dict[str, dict]) -> list[Moved]:
    moved = []
    for row in sorted(set(now) | set(baseline)):
        if row not in now or row not in baseline:
            moved.append(Moved(row, "metrics file", "present" if row in baseline else None,
                               "present" if row in now else None, "must exist in both"))
            continue
        family = baseline[row]["family"]
        for key in sorted((set(now[row]) | set(baseline[row])) - {"family"}):
            old, new = baseline[row].get(key), now[row].get(key)
            if key in EXACT or old is None or new is None:
                if old != new:
                    moved.append(Moved(row, key, old, new, "exact"))
            elif not math.isclose(new, old, rel_tol=TOLERANCE[family]):
                moved.append(Moved(row, key, old, new, f"±{100 * TOLERANCE[family]:g}%"))
    for row, values in now.items():  # the margin to the floor, needing no baseline
        corpus, model = row.split("/")
        floor = now.get(f"{corpus}/floor", {}).get("floor_ppl")
        if floor and model == "kn3" and values["test_ppl"] > MAX_OVER_FLOOR * floor:
            moved.append(Moved(row, "test_ppl over the floor", floor * MAX_OVER_FLOOR,
                               values["test_ppl"], f"<= {MAX_OVER_FLOOR} x floor"))
    return moved


def render(moved: list[Moved]) -> str:
    return tabulate([m.cells() for m in moved],
                    headers=["model", "value", "baseline", "now", "change", "allowed"],
                    tablefmt="github")


def report(now: dict[str, dict], baseline: dict[str, dict]) -> tuple[bool, str]:
    """(passed, text for the user)."""
    moved = compare(now, baseline)
    checked = sum(len(v) - 1 for v in now.values())
    if not moved:
        return True, f"regression: all {checked} values of {len(now)} rows match the baseline"
    return False, (f"regression: {len(moved)} value(s) moved against {BASELINE.name} "
                   f"(update it on purpose with `make regression-baseline`):\n\n"
                   + render(moved))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true",
                        help="write this run's values as the new baseline")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args(argv)
    from tests.conftest import mirror_path

    root = args.keep or Path(tempfile.mkdtemp(prefix="lmb-regression-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        repo, env = make_workspace(root, mirror_path())
        print(f"regression: dvc repro in {repo} ...", flush=True)
        done = repro(repo, env)
        if done.returncode != 0:
            print(f"dvc repro failed:\n{(done.stdout + done.stderr)[-3000:]}")
        now = collect(repo)
        if args.update:
            if done.returncode != 0:
                print("not updating the baseline from a failed run")
                return 1
            BASELINE.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n")
            print(f"wrote {BASELINE} ({len(now)} rows); review and commit it")
            return 0
        passed, text = report(now, json.loads(BASELINE.read_text()))
        print(text)
        return 0 if passed and done.returncode == 0 else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
