"""A tracking server for a team: `mlflow server` on a PostgreSQL backend store with a shared
artifact root, reached through MLFLOW_TRACKING_URI (SQLite stays the embedded default).

The test starts a real PostgreSQL server (Debian's `postgresql` package: initdb into a
temporary folder, as the `postgres` user when run as root, on 127.0.0.1 and a free port,
password authentication) and `mlflow server` on it, runs the tiny pipeline configuration
(tests/conftest.py TINY) with MLFLOW_TRACKING_URI pointing at the server, and checks, through
MLflow's REST API (runs/search, metrics/get-history, artifacts/list), that every run is
there, finished and tagged, that every metric's history is complete and agrees with the
files the stages wrote, that artifacts landed in the server's artifact root, and, in
PostgreSQL itself, that the rows are there; nothing fell back to a SQLite store.

1.5 to 3 minutes on a 2-core machine (mostly the eight stages' start-up), so CI skips it:

    make team-server-test     # installs postgresql if missing; = LMB_TEAM_SERVER=1 pytest ...
"""

from __future__ import annotations

import contextlib
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
                                 reason="1.5 to 3 minutes: run with LMB_TEAM_SERVER=1 "
                                 "(make team-server-test)")
MLFLOW = Path(sys.executable).parent / "mlflow"


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


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server of its own on 127.0.0.1:<free port>, with a database `mlflow`
    owned by a user `lmb` with a password; yields its SQLAlchemy URI (psycopg2's driver).
    PostgreSQL refuses to run as root: then it runs as the `postgres` user (the package
    creates it) in a folder that user owns."""
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
    pwfile.write_text(password + "\n")
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
            with contextlib.closing(psycopg2.connect(
                    host="127.0.0.1", port=port, user="lmb", password=password,
                    dbname="postgres")) as connection:
                connection.autocommit = True  # CREATE DATABASE runs outside a transaction
                with connection.cursor() as cursor:
                    cursor.execute("CREATE DATABASE mlflow")
            # the driver named: SQLAlchemy 2.1's default for postgresql:// is psycopg 3
            yield f"postgresql+psycopg2://lmb:{password}@127.0.0.1:{port}/mlflow"
        finally:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(store_uri: str, artifacts: Path, timeout_s: float = 120) -> Iterator[str]:
    """`mlflow server` on the store, with `artifacts` as its artifact root (served: clients
    upload through the server, so they need no access to the folder); yields its URL."""
    import requests

    port = free_port()
    log = open(artifacts.parent / "mlflow-server.log", "w")  # closed below
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", store_uri,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                text = (artifacts.parent / "mlflow-server.log").read_text()
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


def rest(url: str, endpoint: str, payload: dict | None = None, **query) -> dict:
    """One REST call: POST with a JSON body, or GET with query parameters."""
    import requests

    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if payload is not None:
        response = requests.post(address, json=payload, timeout=30)
    else:
        response = requests.get(address, params=query, timeout=30)
    assert response.status_code == 200, f"{endpoint}: {response.status_code} {response.text}"
    return response.json()


def search_runs(url: str, experiment_ids: list[str]) -> list[dict]:
    runs, token = [], None
    while True:
        page = rest(url, "runs/search", {"experiment_ids": experiment_ids, "max_results": 100,
                                         **({"page_token": token} if token else {})})
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def history(url: str, run_id: str, key: str) -> list[dict]:
    points, token = [], None
    while True:
        page = rest(url, "metrics/get-history", run_id=run_id, metric_key=key,
                    **({"page_token": token} if token else {}))
        points += page.get("metrics", [])
        token = page.get("next_page_token")
        if not token:
            return points


def test_sqlite_measures_leave_a_server_alone(tmp_path, monkeypatch, capsys):
    """The lock file and the artifact location beside the store are for SQLite only, and
    `make ui` points at a server's own UI instead of serving a second one."""
    from pipeline import tracking

    url = "http://127.0.0.1:5000"
    monkeypatch.chdir(tmp_path)
    assert tracking.artifact_location(url, "ptb") is None
    assert tracking.artifact_location("postgresql+psycopg2://u@h/db", "ptb") is None
    with tracking._first_access_lock(url):
        pass
    assert list(tmp_path.iterdir()) == []  # no lock file, no store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    tracking.main([])  # returns: no `mlflow ui` exec'd
    assert f"open {url}" in capsys.readouterr().out


@pytest.mark.slow
@TEAM_SERVER
def test_pipeline_against_a_postgres_backed_server(tmp_path, mirror):
    import psycopg2

    from pipeline import tracking

    corpus, model = TINY["corpora"][0], TINY["train"]["models"][0]
    ngram = f"kn{TINY['ngram']['orders'][0]}"
    artifacts = tmp_path / "artifacts"  # the team's shared artifact root
    artifacts.mkdir()
    with postgres_server() as store, mlflow_server(store, artifacts) as url:
        repo, env = tiny_workspace(tmp_path / "work", mirror)
        env["MLFLOW_TRACKING_URI"] = url
        # the SQLite-only measures stay out of a server's way: no lock file, no
        # artifact location of our own (the server's root holds them)
        assert tracking.artifact_location(url, corpus) is None
        started = time.monotonic()
        done = regression.repro(repo, env)
        log = done.stdout + done.stderr
        assert done.returncode == 0, f"dvc repro failed:\n{log[-4000:]}"
        print(f"dvc repro against the server: {time.monotonic() - started:.0f} s")
        assert "retrying" not in log  # no store call failed, not even once
        assert not list(tmp_path.rglob("mlflow.db*")) and not list(tmp_path.rglob("mlruns"))

        experiments = {e["name"]: e["experiment_id"] for e in
                       rest(url, "experiments/search", {"max_results": 100})["experiments"]}
        assert {corpus, "summary"} <= set(experiments)
        runs = search_runs(url, [experiments[corpus], experiments["summary"]])
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
                points = history(url, info["run_id"], key)
                assert points, (info["run_name"], key)
                points_served += len(points)
                newest = max(points, key=lambda p: (int(p["step"]), int(p["timestamp"])))
                assert newest["value"] == pytest.approx(last["value"]), (info["run_name"], key)
            listed = rest(url, "artifacts/list", run_id=info["run_id"]).get("files", [])
            assert listed, f"{info['run_name']} has no artifact"

        for name in (ngram, model):  # the metrics files and the runs agree
            written = json.loads((repo / "reports" / "metrics" / corpus / f"{name}.json")
                                 .read_text())
            run = by_name[f"{corpus}/{name}"]
            latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert latest["test_ppl"] == pytest.approx(written["test_ppl"])
            assert len(history(url, run["info"]["run_id"], "test_ppl")) == 1
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert (tags["corpus"], tags["model"]) == (corpus, name)
        # the learning curve, point by point (step = training tokens)
        curve = json.loads((repo / "reports" / "curves" / corpus / f"{model}.json").read_text())
        points = history(url, by_name[f"{corpus}/{model}"]["info"]["run_id"], "curve_valid_ppl")
        points = sorted(points, key=lambda p: int(p["step"]))
        assert [int(p["step"]) for p in points] == [c["tokens"] for c in curve]
        assert [p["value"] for p in points] == pytest.approx([c["valid_ppl"] for c in curve])
        # artifacts went through the server into its root, not into the workspace
        assert (artifacts / experiments[corpus]).is_dir()
        assert list(artifacts.rglob(f"{ngram}.json")) and list(artifacts.rglob("leaderboard.html"))

        # and the rows are in PostgreSQL
        with contextlib.closing(psycopg2.connect(store.replace("+psycopg2", ""))) as connection, \
                connection.cursor() as cursor:
            cursor.execute("SELECT name, status FROM runs WHERE lifecycle_stage = 'active'")
            rows = sorted(cursor.fetchall())
            cursor.execute("SELECT count(*) FROM metrics")
            metric_rows = cursor.fetchone()[0]
        assert rows == sorted((name, "FINISHED") for name in by_name)
        assert metric_rows == points_served  # every point PostgreSQL holds, served
