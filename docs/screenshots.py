"""Regenerate the MLflow UI screenshots of the docs: ``python docs/screenshots.py``.

Runs a short ``qi tune`` on the embedded castings against a throwaway MLflow tracking server
(the tracking image's command, sqlite backend), then photographs three views of the study in
headless Chromium driven by Playwright: the runs table with the trials nested under the
study's parent run (``ui-runs.png``), the parent run's description, which is the evaluation
summary (``ui-description.png``), and its evaluation artifacts (``ui-evaluation.png``).

Needs Debian's ``chromium`` (``apt-get install chromium``; ``--chromium`` for another binary)
and ``pip install playwright`` (only its driver is used: it downloads no browser). Nothing
else leaves the machine: Chromium starts without background networking.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qi.services import interpreter_env, tracking_server

DOCS = Path(__file__).resolve().parent
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}


def run_study(url: str, workdir: Path, timeout: int) -> None:
    """A ``qi tune`` of ``timeout`` seconds on the embedded castings, tracked at ``url``."""
    env = interpreter_env(MLFLOW_TRACKING_URI=url)
    command = ["qi", "tune", "--timeout", str(timeout), "--no-progress"]
    subprocess.run(command, cwd=workdir, env=env, check=True)


def study_run(url: str) -> tuple[str, str] | None:
    """(experiment id, parent run id) of the latest study's parent run, if any."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`mlflow.runName` LIKE '%-study'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    return runs[0].info.experiment_id, runs[0].info.run_id


def photograph(url: str, experiment: str, run: str, out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    base = f"{url}/#/experiments/{experiment}"
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport=VIEWPORT)

        page.goto(f"{base}/runs?workflowType=machine_learning")
        page.get_by_text("-study").first.wait_for(timeout=60_000)
        _close_assistant(page)
        study_cell = page.locator("[role=gridcell]", has_text="-study").first
        study_cell.locator("button[data-component-id*='runnamecellrenderer']").click()
        page.get_by_text("-trial-").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1500)
        shots.append(_shot(page, out / "ui-runs.png"))

        page.goto(f"{base}/runs/{run}?workflowType=machine_learning")
        page.get_by_text("Operating").first.wait_for(timeout=60_000)
        _close_assistant(page)
        page.wait_for_timeout(1500)
        shots.append(_shot(page, out / "ui-description.png"))

        page.goto(
            f"{base}/runs/{run}/artifacts/evaluation/misclassified.png?workflowType=machine_learning"
        )
        # The artifact viewer keeps hidden preview images in the page: wait for the shown one.
        page.locator("img:visible").first.wait_for(timeout=60_000)
        _close_assistant(page)
        page.wait_for_timeout(2500)
        shots.append(_shot(page, out / "ui-evaluation.png"))
        browser.close()
    return shots


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its assistant panel beside every page: close it, where it is open."""
    close = page.locator("button[aria-label='Close']")
    if close.count() and close.first.is_visible():
        close.first.click()
        page.wait_for_timeout(500)


def _shot(page, path: Path) -> Path:
    page.screenshot(path=str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS, help="folder of the PNG files")
    parser.add_argument("--timeout", type=int, default=150, help="the study's budget, seconds")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the tracking store here; a store that already holds a study is photographed"
        " as it is (default: a temporary folder)",
    )
    args = parser.parse_args()
    if not Path(args.chromium).is_file():
        raise SystemExit(f"{args.chromium} not found: apt-get install chromium, or --chromium")
    os.environ.pop("MLFLOW_RUN_ID", None)
    with tempfile.TemporaryDirectory(prefix="qi-screenshots-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        store = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
        with tracking_server(store, workdir.resolve() / "artifacts") as url:
            found = study_run(url)
            if found is None:
                run_study(url, workdir, args.timeout)
                found = study_run(url)
            if found is None:
                raise SystemExit(f"no study run found at {url}: did qi tune finish?")
            for shot in photograph(url, *found, args.out, args.chromium):
                print(shot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
