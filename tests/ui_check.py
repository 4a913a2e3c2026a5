"""Look at what users look at: the MLflow UI and reports/leaderboard.html, in a
real headless Chromium, over a real MLflow server on the loopback interface.

Used by tests/test_pipeline.py, and on its own against this checkout's store:

    make screenshots    # = python -m tests.ui_check --out reports/screenshots
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store_uri: str, timeout_s: float = 90) -> Iterator[str]:
    """Start `mlflow server` on 127.0.0.1:<free port>; yield its base URL."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    with tempfile.TemporaryDirectory() as artifacts:
        proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--default-artifact-root", artifacts],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def rest(url: str, endpoint: str, payload: dict | None = None) -> dict:
    """One MLflow REST call (POST with a JSON body, or GET)."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Chromium found: run `make browser-deps` (installs Debian's chromium)")


def _chromium_run(url: str, *args: str, wait_ms: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--virtual-time-budget={wait_ms}", *args, url],
            capture_output=True, text=True, timeout=180, check=True)


def page_text(url: str, wait_ms: int = 15000) -> str:
    """The page's DOM after its scripts ran (what a reader would see, as HTML)."""
    return _chromium_run(url, "--dump-dom", wait_ms=wait_ms).stdout


def screenshot(url: str, out: Path, wait_ms: int = 15000, size: str = "1400,1000") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    _chromium_run(url, f"--screenshot={out}", f"--window-size={size}", wait_ms=wait_ms)
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot of {url}")
    return out


def experiment_url(url: str, name: str) -> str:
    experiment = rest(url, f"experiments/get-by-name?experiment_name={name}")["experiment"]
    return f"{url}/#/experiments/{experiment['experiment_id']}/runs"  # the runs table


def main() -> None:
    parser = argparse.ArgumentParser(description="screenshots of the MLflow UI and the report")
    parser.add_argument("--out", type=Path, default=Path("reports/screenshots"))
    parser.add_argument("--experiment", default="ptb")
    args = parser.parse_args()
    store = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    report = Path("reports/leaderboard.html").resolve()
    shots = [screenshot(report.as_uri(), args.out / "leaderboard.png", size="1400,3000")]
    with mlflow_server(store) as url:
        shots.append(screenshot(experiment_url(url, args.experiment),
                                args.out / f"mlflow-{args.experiment}.png"))
    for shot in shots:
        print(shot)


if __name__ == "__main__":
    main()
