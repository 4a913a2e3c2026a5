"""The regression check: the whole pipeline on a small configuration, against a baseline.

    python -m tests.regression            # run, compare, print what moved (exit 1 if anything)
    python -m tests.regression --update   # run and write the baseline on purpose
                                          # (= make regression-baseline; commit the result)

`dvc repro` runs in a temporary copy of the repository with tests/regression.yaml
merged over params.yaml: the synthetic corpus (100k training tokens), the first
lines of PTB from the mirror (as a `custom` corpus), Tiny Shakespeare (characters)
and PTB, KN 2-, 3- and 5-grams and every neural model kind, small, on one CPU
thread, so every number is deterministic. Then, for every corpus/model row the run
configured (whatever corpora and models that is), its metrics file, its sample and
its leaderboard and report rows are compared with tests/regression_baseline.json:

    token counts, vocabulary (size, digest),  exactly
    level, epochs, training tokens, size
    (parameters or n-grams)
    n-gram perplexities and bits per char    within TOLERANCE["ngram"] (relative)
    neural perplexities and bits per char    within TOLERANCE["neural"] (relative)
    the synthetic corpus's floor             within TOLERANCE["floor"] (relative)
    sample text (same seed, temperature      exactly (a neural model's only on the
    and prompt), and those settings          machine the baseline was recorded on)
    the leaderboard's published-reference    exactly (text); "ours - published"
    cells and the report's "ours -           within the row's tolerance of its test
    published" cell                          perplexity, plus the 0.01 it is rounded to

plus one check that needs no baseline: the KN 3-gram on the synthetic corpus
stays within MAX_OVER_FLOOR of the source's entropy floor. A stage that fails
leaves its rows missing, and they are reported as such beside what moved.
tests/test_regression.py runs this in CI.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from tabulate import tabulate

from pipeline.atomic import write_text
from pipeline.leaderboard_table import COMMITTED_HEADING
from pipeline.lineup import configured_models
from pipeline.params import ParamsError, load_section, read_params

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "regression.yaml"
BASELINE = REPO / "tests" / "regression_baseline.json"
BIN = Path(sys.executable).parent
PTB_SLICE_LINES = {"train": 2000, "valid": 300, "test": 300}  # CI time
TOLERANCE = {"ngram": 1e-4, "neural": 0.01, "floor": 1e-9}
EXACT = ("valid_tokens", "test_tokens", "vocab_size", "epochs")
# from the metrics files: compared within the row family's TOLERANCE, or exactly
APPROXIMATE = ("valid_ppl", "test_ppl", "valid_bpc", "test_bpc")
METRICS = (*APPROXIMATE, *EXACT, "level", "vocab_digest", "train_tokens", "size", "size_unit",
           "precision")  # a baseline recorded in bf16 is not one for fp32
SAMPLE_SETTINGS = ("seed", "temperature", "prompt", "length")
DIFFERENCE = ("leaderboard_difference", "report_difference")  # "ours - published", rendered
LEADERBOARD_COLUMNS = {"published test ppl (source)": "leaderboard_published",
                       "ours − published": "leaderboard_difference"}
REPORT_COLUMNS = {"ours − published": "report_difference"}
MACHINE = "machine"  # the row that records the CPU kernels and torch behind the values
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


def configuration(params: Path = REPO / "params.yaml") -> dict:
    """The regression's params: tests/regression.yaml merged over `params`."""
    return merge(yaml.safe_load(params.read_text()), yaml.safe_load(CONFIG.read_text()))


def mirror() -> Path:
    """The corpora mirror (tests/conftest.py's rule) for a command-line run: without one,
    a one-line exit naming where it looked, not pytest's failure outside pytest."""
    import pytest

    from tests.conftest import mirror_path

    try:
        return mirror_path()
    except pytest.fail.Exception as exc:
        raise SystemExit(str(exc)) from None


def make_workspace(root: Path, mirror: Path) -> tuple[Path, dict]:
    """A git-initialised copy of the repository under root/repo, configured for the
    regression; returns it and the environment to run DVC in."""
    repo = root / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        # dvc.lock describes the full pipeline, not this one, and reports/ holds its
        # results: a stage that does not run here must leave no stale file to compare
        # (the committed runs of reports/reproductions are an input: the leaderboard shows them)
        if (REPO / name).is_file() and name != "dvc.lock" and (
                not name.startswith("reports/") or name.startswith("reports/reproductions/")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    corpus = root / "ptb-slice"
    corpus.mkdir()
    for split, n in PTB_SLICE_LINES.items():
        lines = (mirror / "ptb" / f"ptb.{split}.txt").read_text().splitlines(keepends=True)
        (corpus / f"{split}.txt").write_text("".join(lines[:n]))
    params = configuration(repo / "params.yaml")
    params["download"]["custom_path"] = str(corpus)
    params["download"]["mirror"] = str(mirror)  # the real corpora, never the network
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo, workspace_env(root)


def workspace_env(root: Path) -> dict:
    """The environment DVC runs in for the workspace under `root`: its own MLflow store."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DVC_", "MLFLOW_", "LMB_"))}
    env.update(PATH=f"{BIN}:{env['PATH']}", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # same numbers on any core count
    return env


def repro(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`dvc repro --keep-going`: a failing stage still lets the others produce metrics."""
    return subprocess.run([str(BIN / "dvc"), "repro", "--keep-going", *args], cwd=repo,
                          env=env, capture_output=True, text=True)


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    """A command that must succeed; its stdout and stderr (the tail shown if it fails)."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{output[-4000:]}"
    return output


def ran_stages(log: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` log says it ran."""
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


def collect(repo: Path) -> dict[str, dict]:
    """corpus/model -> the compared values of every model the run configured: its metrics
    file (written even when a later stage fails), its sample, its cells in the rendered
    leaderboard and report; plus corpus/samples (the sample settings) and corpus/floor
    (a corpus with a known source). A value whose file is missing is simply absent."""
    values: dict[str, dict] = {}
    reports = repo / "reports"
    leaderboard = _markdown_cells(reports / "leaderboard.md", LEADERBOARD_COLUMNS)
    report = _html_cells(reports / "leaderboard.html", REPORT_COLUMNS)
    for corpus, models in configured_models(repo / "params.yaml").items():
        samples_file = reports / "samples" / f"{corpus}.json"
        samples = json.loads(samples_file.read_text()) if samples_file.exists() else {}
        for model in models:
            path = reports / "metrics" / corpus / f"{model}.json"
            if path.exists():
                metrics = json.loads(path.read_text())
                values[f"{corpus}/{model}"] = {
                    "family": metrics["family"], **{k: metrics[k] for k in METRICS if k in metrics},
                    **leaderboard.get((corpus, model), {}), **report.get((corpus, model), {})}
                if model in samples.get("samples", {}):
                    values[f"{corpus}/{model}"]["sample"] = samples["samples"][model]
        if samples:
            values[f"{corpus}/samples"] = {"family": "samples",
                                           **{k: samples[k] for k in SAMPLE_SETTINGS}}
        vocab = repo / "data" / "prepared" / corpus / "vocab.json"
        source = json.loads(vocab.read_text()).get("source") if vocab.exists() else None
        if source:
            values[f"{corpus}/floor"] = {"family": "floor", "floor_ppl": source["floor_ppl"]}
    values[MACHINE] = machine()
    return values


def machine() -> dict:
    """What a neural model's exact trajectory depends on besides the commit: the CPU and
    the kernels torch picks for it (AVX2 or AVX-512 round differently), torch itself."""
    import torch

    from pipeline.perplexity import cpu_model

    return {"family": "machine", "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def _cell(text: str) -> float | str:
    """A rendered cell: its number when it is one ("-0.01", "1,234.5"), else its text."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def _markdown_cells(path: Path, columns: dict[str, str]) -> dict[tuple[str, str], dict]:
    """(corpus, model) -> {key: cell} for `columns` (header -> key) of the leaderboard's
    Markdown tables, one per `## corpus` section."""
    cells: dict[tuple[str, str], dict] = {}
    corpus, header = None, None
    for line in path.read_text().splitlines() if path.exists() else []:
        if line == f"## {COMMITTED_HEADING}":  # the committed runs: not this pipeline's
            break
        if line.startswith("## "):
            corpus, header = line[3:].strip(), None
        elif line.startswith("|") and corpus is not None and not line.startswith("|---"):
            row = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if header is None:
                header = row
            else:
                cells[corpus, row[0]] = {key: _cell(row[header.index(name)])
                                         for name, key in columns.items() if name in header}
    return cells


def _html_cells(path: Path, columns: dict[str, str]) -> dict[tuple[str, str], dict]:
    """The same for the report page's tables, one after each `<h2 id='corpus'>`."""
    cells: dict[tuple[str, str], dict] = {}
    page = path.read_text() if path.exists() else ""
    for section in re.split(r"<h2 id='", page)[1:]:
        corpus = html.unescape(section.split("'", 1)[0])
        table = re.search(r"<table>(.*?)</table>", section, re.S)
        if table is None:
            continue
        header = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", table.group(1))]
        for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table.group(1).split("</thead>")[-1]):
            row = [html.unescape(c).strip() for c in re.findall(r"<td>(.*?)</td>", tr, re.S)]
            model = row[0].removeprefix("★ ")
            cells[corpus, model] = {key: _cell(row[header.index(name)])
                                    for name, key in columns.items() if name in header}
    return cells


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
        shown = value.replace("\n", "⏎")
        return shown if len(shown) <= 48 else shown[:47] + "…"
    return f"{value:,.4f}" if isinstance(value, float) else f"{value:,}"


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def compare(now: dict[str, dict], baseline: dict[str, dict],
            neural_samples: bool | None = None) -> list[Moved]:
    """What moved. A neural sample is compared only on the machine the baseline was
    recorded on (MACHINE; `neural_samples` None) or when asked to: elsewhere float
    rounding takes training along another path, within the perplexity tolerance, but a
    sampled word can change."""
    moved = []
    same_machine = now.get(MACHINE) == baseline.get(MACHINE) if neural_samples is None \
        else neural_samples
    for row in sorted((set(now) | set(baseline)) - {MACHINE}):
        if row not in now or row not in baseline:
            what = "samples file" if row.endswith("/samples") else "metrics file"
            moved.append(Moved(row, what, "present" if row in baseline else None,
                               "present" if row in now else None, "must exist in both"))
            continue
        family = baseline[row]["family"]
        for key in sorted((set(now[row]) | set(baseline[row])) - {"family"}):
            if key == "sample" and family == "neural" and not same_machine:
                continue
            old, new = baseline[row].get(key), now[row].get(key)
            numbers = _number(old) and _number(new)
            if numbers and key in DIFFERENCE and "test_ppl" in now[row]:
                # ours - published moves with our test ppl; rendered to 0.01
                allowed = TOLERANCE[family] * now[row]["test_ppl"] + 0.01
                if abs(new - old) > allowed + 1e-9:
                    moved.append(Moved(row, key, old, new, f"±{allowed:.3g}"))
            elif numbers and (key in APPROXIMATE or family == "floor"):
                if not math.isclose(new, old, rel_tol=TOLERANCE[family]):
                    moved.append(Moved(row, key, old, new, f"±{100 * TOLERANCE[family]:g}%"))
            elif old != new:
                moved.append(Moved(row, key, old, new, "exact"))
    for row, values in now.items():  # the margin to the floor, needing no baseline
        if row == MACHINE:
            continue
        corpus, model = row.split("/")
        floor = now.get(f"{corpus}/floor", {}).get("floor_ppl")
        if floor and model == "kn3" and values.get("test_ppl", 0) > MAX_OVER_FLOOR * floor:
            moved.append(Moved(row, "test_ppl over the floor", floor * MAX_OVER_FLOOR,
                               values["test_ppl"], f"<= {MAX_OVER_FLOOR} x floor"))
    return moved


def render(moved: list[Moved]) -> str:
    return tabulate([m.cells() for m in moved],
                    headers=["model", "value", "baseline", "now", "change", "allowed"],
                    tablefmt="github")


def report(now: dict[str, dict], baseline: dict[str, dict],
           changed: list[str] | None = None) -> tuple[bool, str]:
    """(passed, text for the user). `changed`: the params changes of this run (--set),
    whose neural samples are then not compared either."""
    moved = compare(now, baseline, neural_samples=False if changed else None)
    checked = sum(len(v) - 1 for k, v in now.items() if k != MACHINE)
    note = ""
    if changed:
        note = f" (neural samples not compared: this run changes {', '.join(changed)})"
    elif now.get(MACHINE) != baseline.get(MACHINE):
        were = {k: v for k, v in (baseline.get(MACHINE) or {}).items() if k != "family"}
        here = {k: v for k, v in now[MACHINE].items() if k != "family"}
        note = (f" (neural samples not compared: the baseline was recorded with "
                f"{were or 'an unrecorded machine'}, this run with {here})")
    if not moved:
        return True, (f"regression: all {checked} values of {len(now) - 1} rows match the "
                      f"baseline{note}")
    return False, (f"regression: {len(moved)} value(s) moved against {BASELINE.name} "
                   f"(update it on purpose with `make regression-baseline`){note}:\n\n"
                   + render(moved))


def change_params(path: Path, changes: list[str]) -> None:
    """Apply `key.sub=value` changes (values read as YAML) to the params file at `path`."""
    params = yaml.safe_load(path.read_text())
    for change in changes:
        key, equals, value = change.partition("=")
        if not equals:
            raise SystemExit(f"--set {change}: expected KEY=VALUE")
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise SystemExit(f"--set {change}: no params key {key}")
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SystemExit(f"--set {change}: the value is not valid YAML") from None
        print(f"regression: {key} = {node[last]!r}", flush=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    if changes:
        try:  # before minutes of `dvc repro`: every section as its stage will read it
            check_sections(path)
        except ParamsError as exc:
            raise SystemExit(f"--set {' '.join(changes)}: {exc}") from None


def check_sections(path: Path) -> None:
    """Load every section of the params file at `path` as its stage does (ParamsError)."""
    from pipeline.analysis import AnalyseParams
    from pipeline.encoding import PrepareParams
    from pipeline.fetch import DownloadParams
    from pipeline.kneser_ney import NgramParams
    from pipeline.presets import TrainParams
    from pipeline.sampling import SampleParams

    for section, cls in (("download", DownloadParams), ("prepare", PrepareParams),
                         ("ngram", NgramParams), ("train", TrainParams),
                         ("analyse", AnalyseParams), ("sample", SampleParams)):
        if section in read_params(path):
            load_section(section, cls, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true",
                        help="write this run's values as the new baseline")
    parser.add_argument("--keep", type=Path,
                        help="run in this folder and keep it (with repro.log; the tests can "
                        "reuse it: LMB_PIPELINE_RUN=<folder> pytest ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params change over the regression configuration, e.g. "
                        "train.cpu_precision=fp32: is it within the baseline's tolerances? "
                        "(repeatable; not with --update or --keep)")
    args = parser.parse_args(argv)
    if args.set and (args.update or args.keep):
        parser.error("--set checks a change against the baseline; --update and --keep are "
                     "for the configuration as committed")
    if args.keep and args.keep.is_dir() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: not empty (a kept run is reused with "
                     f"LMB_PIPELINE_RUN={args.keep}); give a new or empty folder")
    root = args.keep or Path(tempfile.mkdtemp(prefix="lmb-regression-"))
    root.mkdir(parents=True, exist_ok=True)
    # a stop by SIGTERM (a CI timeout, `timeout`) unwinds like Ctrl-C: the finally below
    # removes the temporary workspace. subprocess.run kills the dvc it started; the stage
    # dvc runs stops too when the signal reaches the process group (`timeout` and Ctrl-C
    # send it there), else it may run on in the deleted workspace until it fails
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        repo, env = make_workspace(root, mirror())
        change_params(repo / "params.yaml", args.set)
        print(f"regression: dvc repro in {repo} ...", flush=True)
        started = time.monotonic()
        done = repro(repo, env)
        print(f"regression: dvc repro took {time.monotonic() - started:.0f} s", flush=True)
        (root / "repro.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            print(f"dvc repro failed:\n{(done.stdout + done.stderr)[-3000:]}")
        now = collect(repo)
        if args.update:
            if done.returncode != 0:
                print("not updating the baseline from a failed run")
                return 1
            write_text(BASELINE, json.dumps(now, indent=2, sort_keys=True) + "\n")
            print(f"wrote {BASELINE} ({len(now)} rows); review and commit it")
            return 0
        passed, text = report(now, json.loads(BASELINE.read_text()), changed=args.set)
        print(text)
        return 0 if passed and done.returncode == 0 else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
