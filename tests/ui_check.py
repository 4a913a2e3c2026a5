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


# Colours that only a rendered page puts on screen, each as (red, green, blue) exactly as
# the page's CSS or its images give them, with the fewest pixels that must show it
# (measured: about 90,000 and 2,000 on the report at 1400 x 3000; 33,000 for 8 runs in
# MLflow 3.17's runs table, 0 on its "experiment not found" page). An error page, a
# blank page, a page without its styles or whose images failed to decode shows none.
REPORT_COLOURS = {
    "the best row's highlight (CSS tr.best, #e8f5e9)": ((0xE8, 0xF5, 0xE9), 5_000),
    "the plots' first series (matplotlib's tab:blue, in the page's PNG images)":
        ((0x1F, 0x77, 0xB4), 300),
}
MLFLOW_COLOURS = {
    "the runs table's sorted column (#f1f9ff)": ((0xF1, 0xF9, 0xFF), 10_000),
}


def colour_pixels(png: Path, colours: dict[str, tuple]) -> dict[str, int]:
    """How many pixels of the screenshot have each of `colours` (name -> (rgb, _)), exactly."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        counts = {colour: n for n, colour in rgb.getcolors(maxcolors=rgb.width * rgb.height)}
    return {name: counts.get(colour, 0) for name, (colour, _) in colours.items()}


def assert_shows(png: Path, colours: dict[str, tuple]) -> None:
    """The screenshot shows each of `colours` (name -> (rgb, at least this many pixels))."""
    found = colour_pixels(png, colours)
    missing = {name: n for name, n in found.items() if n < colours[name][1]}
    assert not missing, (f"{png} does not show " + "; ".join(
        f"{name} ({n} pixels, want {colours[name][1]})" for name, n in missing.items()))


def static_html(url: str) -> str:
    """The page as served, before any script ran."""
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode("utf-8", "replace")


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
