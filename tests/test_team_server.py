"""A tracking server for a team: `mlflow server --app-name basic-auth` on a PostgreSQL backend
store with a shared artifact root, reached through MLFLOW_TRACKING_URI with a login in
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (SQLite stays the embedded default and
needs none).

The test starts a real PostgreSQL server (Debian's `postgresql` package: initdb into a
temporary folder, as the `postgres` user when run as root, on 127.0.0.1 and a free port,
password authentication, the password in a password file: PGPASSFILE) and `mlflow server`
on it with the committed deploy/mlflow-auth.ini (its user store moved into the temporary
folder), the admin password and the CSRF key in its environment. It sets the server up as
the README does (`python -m pipeline.tracking_admin experiments` and `user`: a writer and a
reader), and checks that the door is shut: nothing on any command line in `ps` holds a
password; an anonymous request and a wrong password get 401; the reader can neither
create nor delete a run (403), nor can the writer delete one. Then it runs the tiny
pipeline configuration (tests/conftest.py TINY) as the writer and checks, through MLflow's
REST API (runs/search, metrics/get-history, artifacts/list, as the reader) and in
PostgreSQL itself, that every run is there, finished and tagged, that every metric's
history is complete and agrees with the files the stages wrote, that artifacts landed in
the server's artifact root; and it reruns one stage with no login, a wrong password and
the reader's login: each fails in one line (naming the variables, the server, or the
experiment), its output written.

2 to 3 minutes on a 2-core machine (mostly the eight stages' start-up), so CI skips it:

    make team-server-test     # installs postgresql if missing; = LMB_TEAM_SERVER=1 pytest ...
"""

from __future__ import annotations

import configparser
import contextlib
import io
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import regression
from tests.conftest import TINY, tiny_workspace
from tests.ui_check import free_port

TEAM_SERVER = pytest.mark.skipif(os.environ.get("LMB_TEAM_SERVER") != "1",
                                 reason="2 to 3 minutes: run with LMB_TEAM_SERVER=1 "
                                 "(make team-server-test)")
MLFLOW = Path(sys.executable).parent / "mlflow"
AUTH_INI = regression.REPO / "deploy" / "mlflow-auth.ini"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's binaries (Debian keeps them off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("no PostgreSQL server found: `make team-server-deps` installs Debian's "
                    "postgresql (or: sudo apt-get install postgresql)")
    return Path(initdb).parent


def private_file(path: Path, text: str) -> None:
    """A file only its owner can read, created so (never readable for a moment)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)


@contextlib.contextmanager
def postgres_server(pgpass: Path) -> Iterator[str]:
    """A PostgreSQL server of its own on 127.0.0.1:<free port>, with a database `mlflow`
    owned by a user `lmb` whose password goes into the password file `pgpass` (libpq's
    PGPASSFILE format); yields its SQLAlchemy URI (psycopg2's driver), which holds no
    password. PostgreSQL refuses to run as root: then it runs as the `postgres` user (the
    package creates it) in a folder that user owns."""
    import psycopg2

    bindir = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="lmb-postgres-"))  # not pytest's: 0700, root's
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    folder.chmod(0o700)
    password = secrets.token_hex(8)
    pwfile = folder / "pwfile"
    private_file(pwfile, password + "\n")
    if as_user:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", free_port()

    def pg(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{cmd[0]} failed:\n{done.stdout}{done.stderr}"

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "lmb", "-E", "UTF8",
           "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
           "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "start")
        try:
            private_file(pgpass, f"127.0.0.1:{port}:*:lmb:{password}\n")
            with contextlib.closing(psycopg2.connect(
                    host="127.0.0.1", port=port, user="lmb", passfile=str(pgpass),
                    dbname="postgres")) as connection:
                connection.autocommit = True  # CREATE DATABASE runs outside a transaction
                with connection.cursor() as cursor:
                    cursor.execute("CREATE DATABASE mlflow")
            # the driver named: SQLAlchemy 2.1's default for postgresql:// is psycopg 3
            yield f"postgresql+psycopg2://lmb@127.0.0.1:{port}/mlflow"
        finally:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(store_uri: str, artifacts: Path, pgpass: Path, admin_password: str,
                  timeout_s: float = 120) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` on the store, with `artifacts` as its artifact
    root (served: clients upload through the server) and deploy/mlflow-auth.ini as its
    configuration, the user store moved beside `artifacts`; every secret goes through the
    environment or a file. Yields its URL."""
    import requests

    folder = artifacts.parent
    config = configparser.ConfigParser()
    config.read(AUTH_INI)
    config["mlflow"]["database_uri"] = f"sqlite:///{folder / 'users.db'}"
    with open(folder / "auth.ini", "w") as ini:
        config.write(ini)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(folder / "auth.ini"), PGPASSFILE=str(pgpass),
               MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # as the README: no GenAI jobs
    port = free_port()
    log = open(folder / "mlflow-server.log", "w")  # closed below
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--app-name", "basic-auth", "--backend-store-uri", store_uri,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
         "--port", str(port), "--allowed-hosts", f"127.0.0.1:{port}", "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                text = (folder / "mlflow-server.log").read_text()
                raise RuntimeError(f"mlflow server did not start:\n{text[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def call(url: str, endpoint: str, payload: dict | None = None, auth=None, **query):
    """One REST call, as `auth` (user, password) or anonymous: POST with a JSON body, or
    GET with query parameters. Returns the response."""
    import requests

    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if payload is not None:
        return requests.post(address, json=payload, auth=auth, timeout=30)
    return requests.get(address, params=query, auth=auth, timeout=30)


def rest(url: str, auth, endpoint: str, payload: dict | None = None, **query) -> dict:
    response = call(url, endpoint, payload, auth, **query)
    assert response.status_code == 200, f"{endpoint}: {response.status_code} {response.text}"
    return response.json()


def search_runs(url: str, auth, experiment_ids: list[str]) -> list[dict]:
    runs, token = [], None
    while True:
        page = rest(url, auth, "runs/search",
                    {"experiment_ids": experiment_ids, "max_results": 100,
                     **({"page_token": token} if token else {})})
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def history(url: str, auth, run_id: str, key: str) -> list[dict]:
    points, token = [], None
    while True:
        page = rest(url, auth, "metrics/get-history", run_id=run_id, metric_key=key,
                    **({"page_token": token} if token else {}))
        points += page.get("metrics", [])
        token = page.get("next_page_token")
        if not token:
            return points


def test_sqlite_measures_leave_a_server_alone(tmp_path, monkeypatch, capsys):
    """The lock file and the artifact location beside the store are for SQLite only, `make
    ui` points at a server's own UI instead of serving a second one, and the team server's
    admin commands refuse a store that is not a server, in one line."""
    from pipeline import tracking, tracking_admin

    url = "http://127.0.0.1:5000"
    monkeypatch.chdir(tmp_path)
    assert tracking.artifact_location(url, "ptb") is None
    assert tracking.artifact_location("postgresql+psycopg2://u@h/db", "ptb") is None
    with tracking._first_access_lock(url):
        pass
    assert list(tmp_path.iterdir()) == []  # no lock file, no store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for command in (lambda: tracking_admin.set_user("alice", True),
                    lambda: tracking_admin.create_experiments(["ptb"])):
        with pytest.raises(tracking.TrackingError, match="set MLFLOW_TRACKING_URI") as refused:
            command()
        assert "\n" not in str(refused.value) and "sqlite:///" in str(refused.value)
    assert list(tmp_path.iterdir()) == []  # the SQLite store was not touched
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    tracking_admin.main([])  # returns: no `mlflow ui` exec'd
    assert f"open {url}" in capsys.readouterr().out


def command_lines() -> str:
    """What `ps` shows every local user: the command line of every process."""
    return subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True,
                          check=True).stdout


def set_up(url: str, passwords: dict[str, str], corpus: str, monkeypatch) -> None:
    """The README's set-up, as the admin: the team's experiments, then a writer (through
    the command line, its password on stdin) and a reader."""
    from pipeline import tracking, tracking_admin

    for name, value in (("URI", url), ("USERNAME", "admin"), ("PASSWORD", passwords["admin"])):
        monkeypatch.setenv(f"MLFLOW_TRACKING_{name}", value)
    assert tracking_admin.create_experiments([corpus, tracking.SUMMARY_EXPERIMENT]) == [
        f"experiment {corpus}: created", "experiment summary: created"]
    done = subprocess.run([sys.executable, "-m", "pipeline.tracking_admin", "user", "writer",
                           "--writer"], input=passwords["writer"] + "\n", capture_output=True,
                          text=True, cwd=regression.REPO, env=dict(os.environ), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "user writer: created, writer (EDIT)"
    monkeypatch.setattr(sys, "stdin", io.StringIO(passwords["reader"] + "\n"))
    assert tracking_admin.set_user("reader", None) == "user reader: created, reader"
    monkeypatch.setattr(sys, "stdin", io.StringIO("too short\n"))  # the server's policy
    with pytest.raises(tracking.TrackingError, match="at least 12 characters"):
        tracking_admin.set_user("shorty", None)
    # an address the server does not answer to (--allowed-hosts): said so, not retried
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("127.0.0.1", "localhost"))
    with pytest.raises(tracking.TrackingError, match="one of the server's --allowed-hosts"):
        with tracking.model_run(corpus, "kn2", "ngram", "ngram@x", {}):
            pass


def check_the_door(url: str, passwords: dict[str, str], experiment_id: str) -> None:
    """No login, a wrong password: 401. The reader reads, but cannot create a run: 403."""
    writer, reader = ("writer", passwords["writer"]), ("reader", passwords["reader"])
    search = {"max_results": 10}
    assert call(url, "experiments/search", search).status_code == 401
    assert call(url, "experiments/search", search, ("writer", "not-the-password")).status_code \
        == 401
    assert call(url, "experiments/search", search, reader).status_code == 200
    assert call(url, "runs/create", {"experiment_id": experiment_id}, reader).status_code == 403
    assert call(url, "runs/search", {"experiment_ids": [experiment_id]}, writer).status_code \
        == 200


def rerun_refused(repo: Path, env: dict, corpus: str, order: int, login: tuple | None,
                  expected: list[str]) -> None:
    """The n-gram stage (its dvc.yaml command) with another login, or none: it writes its
    metrics as before, then fails in one line naming what to fix; no traceback, no retry."""
    metrics = repo / "reports" / "metrics" / corpus / f"kn{order}.json"
    scores = ("valid_ppl", "test_ppl", "test_tokens")  # not its timing
    before = {key: json.loads(metrics.read_text())[key] for key in scores}
    metrics.unlink()
    env = {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_USERNAME",
                                                     "MLFLOW_TRACKING_PASSWORD")}
    if login:
        env.update(MLFLOW_TRACKING_USERNAME=login[0], MLFLOW_TRACKING_PASSWORD=login[1])
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.ngram", "--corpus", corpus, "--order", str(order),
         "--data", f"data/prepared/{corpus}", "--model", f"models/{corpus}/kn{order}.bin",
         "--metrics", str(metrics.relative_to(repo))],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "retrying" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MLflow server ") and "outputs were written" in last, last
    for words in expected:
        assert words in last, last
    written = json.loads(metrics.read_text())  # the result, written before the failure
    assert {key: written[key] for key in scores} == before


@pytest.mark.slow
@TEAM_SERVER
def test_pipeline_against_a_team_server(tmp_path, mirror, monkeypatch):
    import psycopg2

    corpus, model = TINY["corpora"][0], TINY["train"]["models"][0]
    order = TINY["ngram"]["orders"][0]
    ngram = f"kn{order}"
    passwords = {user: secrets.token_urlsafe(12) for user in ("admin", "writer", "reader")}
    reader = ("reader", passwords["reader"])
    artifacts, pgpass = tmp_path / "artifacts", tmp_path / "pgpass"  # the shared root
    artifacts.mkdir()
    started = time.monotonic()
    with postgres_server(pgpass) as store, \
            mlflow_server(store, artifacts, pgpass, passwords["admin"]) as url:
        print(f"PostgreSQL and mlflow server up: {time.monotonic() - started:.0f} s")
        shown = command_lines()
        assert f"--app-name basic-auth --backend-store-uri {store} " in shown  # the server
        hidden = [pgpass.read_text().strip().rsplit(":", 1)[1], *passwords.values()]
        leaked = [line for line in shown.splitlines() if any(s in line for s in hidden)]
        for secret in hidden:  # shown without the password
            leaked = [line.replace(secret, "<password>") for line in leaked]
        assert not leaked, f"a password on a command line, in ps: {leaked}"
        started = time.monotonic()
        set_up(url, passwords, corpus, monkeypatch)
        print(f"set-up as the README's admin: {time.monotonic() - started:.0f} s")
        experiments = {e["name"]: e["experiment_id"] for e in
                       rest(url, reader, "experiments/search", {"max_results": 100})
                       ["experiments"]}
        check_the_door(url, passwords, experiments[corpus])

        repo, env = tiny_workspace(tmp_path / "work", mirror)
        env.update(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="writer",
                   MLFLOW_TRACKING_PASSWORD=passwords["writer"])
        started = time.monotonic()
        done = regression.repro(repo, env)
        log = done.stdout + done.stderr
        assert done.returncode == 0, f"dvc repro failed:\n{log[-4000:]}"
        print(f"dvc repro against the server: {time.monotonic() - started:.0f} s")
        assert "retrying" not in log  # no store call failed, not even once
        assert not list(tmp_path.rglob("mlflow.db*")) and not list(tmp_path.rglob("mlruns"))

        started = time.monotonic()
        login = ["MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD", url]
        rerun_refused(repo, env, corpus, order, None, [*login, "asks for a login"])
        rerun_refused(repo, env, corpus, order, ("writer", "not-the-password"),
                      [*login, "refused the login of user 'writer'"])
        rerun_refused(repo, env, corpus, order, reader,
                      [url, f"permission denied for user 'reader' on experiment '{corpus}'"])
        print(f"three refused reruns of ngram@{corpus}-{order}: {time.monotonic() - started:.0f} s")

        assert {corpus, "summary"} <= set(experiments)
        runs = search_runs(url, reader, [experiments[corpus], experiments["summary"]])
        for user in ("reader", "writer"):  # neither may delete a run (EDIT: log, not delete)
            deleted = call(url, "runs/delete", {"run_id": runs[0]["info"]["run_id"]},
                           (user, passwords[user]))
            assert deleted.status_code == 403, (user, deleted.text)
        points_served = check_runs(url, reader, runs, repo, corpus, ngram, model)
        # artifacts went through the server into its root, not into the workspace
        assert (artifacts / experiments[corpus]).is_dir()
        assert list(artifacts.rglob(f"{ngram}.json")) and list(artifacts.rglob("leaderboard.html"))

        # and the rows are in PostgreSQL (the password from the password file)
        with contextlib.closing(psycopg2.connect(store.replace("+psycopg2", ""),
                                                 passfile=str(pgpass))) as connection, \
                connection.cursor() as cursor:
            cursor.execute("SELECT name, status FROM runs WHERE lifecycle_stage = 'active'")
            rows = sorted(cursor.fetchall())
            cursor.execute("SELECT count(*) FROM metrics")
            metric_rows = cursor.fetchone()[0]
        assert rows == sorted((run["info"]["run_name"], "FINISHED") for run in runs)
        assert metric_rows == points_served  # every point PostgreSQL holds, served


def check_runs(url: str, auth, runs: list[dict], repo: Path, corpus: str, ngram: str,
               model: str) -> int:
    """Every stage's run, finished and tagged, each metric's whole history, the metrics files
    and the learning curve, through the REST API; returns the metric points served."""
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert len(by_name) == len(runs)  # one run per stage, nothing twice
    assert set(by_name) == {f"{corpus}/{ngram}", f"{corpus}/{model}", f"{corpus}/samples",
                            f"{corpus}/analysis", "summary/leaderboard"}
    points_served = 0
    for run in runs:
        info, data = run["info"], run["data"]
        assert info["status"] == "FINISHED", info
        tags = {t["key"]: t["value"] for t in data.get("tags", [])}
        assert tags["dvc_stage"] and tags["git_commit"]
        latest = {m["key"]: m for m in data.get("metrics", [])}  # the report logs none
        for key, last in latest.items():  # every metric's history, through the API
            points = history(url, auth, info["run_id"], key)
            assert points, (info["run_name"], key)
            points_served += len(points)
            newest = max(points, key=lambda p: (int(p["step"]), int(p["timestamp"])))
            assert newest["value"] == pytest.approx(last["value"]), (info["run_name"], key)
        listed = rest(url, auth, "artifacts/list", run_id=info["run_id"]).get("files", [])
        assert listed, f"{info['run_name']} has no artifact"

    for name in (ngram, model):  # the metrics files and the runs agree
        written = json.loads((repo / "reports" / "metrics" / corpus / f"{name}.json")
                             .read_text())
        run = by_name[f"{corpus}/{name}"]
        latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert latest["test_ppl"] == pytest.approx(written["test_ppl"])
        assert len(history(url, auth, run["info"]["run_id"], "test_ppl")) == 1
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert (tags["corpus"], tags["model"]) == (corpus, name)
    # the learning curve, point by point (step = training tokens)
    curve = json.loads((repo / "reports" / "curves" / corpus / f"{model}.json").read_text())
    points = history(url, auth, by_name[f"{corpus}/{model}"]["info"]["run_id"],
                     "curve_valid_ppl")
    points = sorted(points, key=lambda p: int(p["step"]))
    assert [int(p["step"]) for p in points] == [c["tokens"] for c in curve]
    assert [p["value"] for p in points] == pytest.approx([c["valid_ppl"] for c in curve])
    return points_served
