"""The one module that talks to MLflow.

Store: $MLFLOW_TRACKING_URI, else `mlflow.db` (SQLite) in the repository root:
$DVC_ROOT, which DVC gives every stage; artifacts in `mlruns/<experiment>` beside
a SQLite store. Under `dvc exp run --queue` (or --temp)
stages run in a temporary copy of the repository that DVC deletes afterwards;
DVC_ROOT then still names the parent repository, so every experiment's runs land
in the one store, written by several workers at once (hence the retries below).
The location is not a DVC param on purpose: where runs are recorded does not
change any result. A team points MLFLOW_TRACKING_URI at an `mlflow server`
(PostgreSQL backend store, shared artifact root; notes in the README): the
SQLite-only measures below (the first-access lock, artifact locations beside
the store) then stay out of the way, and the server keeps the artifacts.

One experiment per corpus, one run per model (`ptb/kn5`), tagged with corpus,
model, family, preset, git commit and DVC stage so runs can be filtered in the UI.

Tracking never costs a result: every store call is retried a bounded number of
times (SQLite answers "database is locked" while another process writes, e.g.
two `dvc queue` workers); if the store stays unavailable, the stage still does
its work and writes its outputs, and `model_run` raises a TrackingError naming
the store when the stage ends, so DVC reruns it once the store is fixed.

A team server asks for a login (MLflow's basic-auth app): the stages send the one in
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. A refusal (401: no login or a
wrong one; 403: a reader's account) is not retried: it fails the same way, in one
line naming the variables or the experiment. The UI and a team server's accounts and
experiments are pipeline/tracking_admin.py's (`python -m pipeline.tracking_admin`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import UserError

STORE_FILE = "mlflow.db"
SUMMARY_EXPERIMENT = "summary"  # the report stage's run: summary/leaderboard
RETRIES = 5
FIRST_DELAY_S = 0.5  # doubled after each failed try
T = TypeVar("T")

log = logging.getLogger(__name__)


class TrackingError(UserError, RuntimeError):
    pass


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ.get("DVC_ROOT") or ".").resolve()
    return f"sqlite:///{root / STORE_FILE}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlruns/<experiment>` beside a SQLite
    store, whichever process creates it (MLflow's default, `./mlruns` in the working
    directory, would put them in a queue worker's temporary copy, which DVC deletes).
    None for a tracking server, which has its own artifact root."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///").split("?")[0])
    return (db.parent.resolve() / "mlruns" / experiment).as_uri()


def open_experiment(name: str, uri: str) -> None:
    """Make `name` the active experiment, creating it with its artifact location if new."""
    import mlflow

    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifact_location(uri, name))
    mlflow.set_experiment(name)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status a tracking server answered with: MLflow's REST calls raise an
    MlflowException, its artifact uploads a requests.HTTPError."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code()
    return getattr(getattr(exc, "response", None), "status_code", None)


def refusal(exc: BaseException, what: str, experiment: str | None = None) -> str | None:
    """A tracking server's 401 or 403 (basic authentication, README "A tracking server for a
    team"; or a host the server does not serve) as one line naming what to set; None for
    any other error. Asking again would only get the same answer: never retried."""
    from mlflow.utils.credentials import read_mlflow_creds

    status = _http_status(exc)
    if status not in (401, 403):
        return None
    server, creds = tracking_uri(), read_mlflow_creds()
    answer = f"{exc} {getattr(getattr(exc, 'response', None), 'text', '')}"
    if status == 403 and "Invalid Host header" in answer:  # MLflow's DNS-rebinding guard
        return (f"MLflow server {server} refused the host it was called by (403 Invalid Host "
                f"header, to {what}): use an address in MLFLOW_TRACKING_URI that is one of "
                "the server's --allowed-hosts.")
    if status == 401 and not (creds.username and creds.password):
        return (f"MLflow server {server} asks for a login (to {what}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it "
                "(the server's admin creates it).")
    if status == 401:
        return (f"MLflow server {server} refused the login of user '{creds.username}' (to "
                f"{what}): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.")
    if experiment is None:
        return (f"MLflow server {server}: permission denied for user '{creds.username}' (to "
                f"{what}): that takes an admin account in MLFLOW_TRACKING_USERNAME.")
    return (f"MLflow server {server}: permission denied for user '{creds.username}' on "
            f"experiment '{experiment}' (to {what}): logging runs needs EDIT on it, which the "
            f"server's admin grants: python -m pipeline.tracking_admin user {creds.username} "
            "--writer.")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _retry(action: Callable[[], T], what: str, experiment: str | None = None) -> T:
    """SQLite stores answer 'database is locked' while another run writes (and a tracking
    server may be briefly unreachable); retry a bounded number of times with backoff, then
    fail with a message naming the store. A server's refusal (401, 403) fails at once."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    rerun = "The stage's outputs were written; rerun once that is done."
    delay = FIRST_DELAY_S
    for attempt in range(1, RETRIES + 1):
        try:
            return action()
        except (MlflowException, SQLAlchemyError, OSError) as exc:  # store errors only
            refused = refusal(exc, what, experiment)
            if refused is not None:
                raise TrackingError(f"{refused} {rerun}") from exc
            if attempt == RETRIES:
                raise TrackingError(
                    f"MLflow store {tracking_uri()} failed to {what} after {RETRIES} tries: "
                    f"{first_line(exc)}. The stage's outputs were written; "
                    "fix the store (or set MLFLOW_TRACKING_URI) and rerun."
                ) from exc
            log.warning("MLflow %s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _first_access_lock(uri: str) -> Iterator[None]:
    """Held around a process's first access to a SQLite store: two processes creating the
    same new store race in MLflow's schema migration ("Online migration expected to
    match one row"), so they take turns through an exclusive lock on `<db>.lock`."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///").split("?")[0])
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = open(db.with_name(db.name + ".lock"), "a")  # closed by the `with` below
    except OSError as exc:  # the store call itself will fail, retried and reported
        log.warning("cannot lock %s.lock (%s); going on without", db, exc)
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class RunLogger:
    """What a stage logs into its open run. After the store has failed for good, logging
    is skipped (the stage goes on) and `failure` holds the error to raise at the end."""

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self.run_id: str | None = None
        self.failure: TrackingError | None = None

    def call(self, action: Callable[[], T], what: str) -> T | None:
        if self.failure is not None:
            return None
        try:
            return _retry(action, what, self.experiment)
        except TrackingError as exc:
            self.failure = exc
            log.error("MLflow: the stage goes on without tracking and fails at its end: %s", exc)
            return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.call(lambda: mlflow.log_metrics(numeric, step=step), "log metrics")

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        import mlflow

        self.call(lambda: mlflow.log_artifact(str(path), artifact_path=folder),
                  "log an artifact")


@contextlib.contextmanager
def model_run(corpus: str, model: str, family: str, stage: str,
              params: dict[str, Any], preset: str = "default") -> Iterator[RunLogger]:
    """Open the MLflow run of one model of one corpus; log its params and tags.
    Raises TrackingError at the end of the block if the store failed for good."""
    import mlflow  # imported here: it is slow to import and only stages that log need it

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # a tracking server that is down: our bounded retries, not also MLflow's own (7 tries
    # with backoff, minutes per call) under each of ours
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = RunLogger(corpus)
    with _first_access_lock(uri):  # creates the store (and its tables) if it is new
        logger.call(lambda: open_experiment(corpus, uri), "open the experiment")
    # MLflow 3's UI opens an experiment of this kind on its runs table (not the GenAI view)
    logger.call(lambda: mlflow.set_experiment_tag("mlflow.experimentKind",
                                                  "custom_model_development"),
                "tag the experiment")
    tags = {
        "corpus": corpus,
        "model": model,
        "family": family,
        "preset": preset,
        "git_commit": git_commit(),
        "dvc_stage": stage,
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
    }
    run = logger.call(lambda: mlflow.start_run(run_name=f"{corpus}/{model}", tags=tags),
                      "start a run")
    if run is not None:
        logger.run_id = run.info.run_id
        flat = {k: str(v) for k, v in _flatten(params).items()}
        logger.call(lambda: mlflow.log_params(flat), "log params")
    status = "FAILED"
    try:
        yield logger
        status = "FINISHED"
    finally:
        if logger.run_id is not None:
            if logger.failure is not None:
                status = "FAILED"  # its record is incomplete
            try:  # even after a failure: never leave the run open (or let MLflow finish it)
                _retry(lambda: mlflow.end_run(status=status), "end the run", corpus)
            except TrackingError as exc:
                logger.failure = logger.failure or exc
    if logger.failure is not None:
        raise logger.failure
