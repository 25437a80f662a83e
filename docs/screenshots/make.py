"""The README's MLflow screenshots, remade from a fresh run: `.venv/bin/python docs/screenshots/make.py`.

Runs a short mfeat sequence (3 tasks, 5 epochs) into a temporary folder (or reads `--store DIR`,
a run's output folder), serves its store with `mmcl ui`, and photographs the pages a user reads
in headless Chromium driven by Playwright. Needs Debian's chromium (`apt-get install chromium`)
and `pip install playwright` (it drives that chromium; no browser download, no network).
Writes docs/screenshots/*.png.
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from mlflow.tracking import MlflowClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MMCL = [sys.executable, "-m", "pipeline.cli"]
VIEW = "workflowType=machine_learning"  # the UI's model-training view (its default is GenAI)
CLOSE_ASSISTANT = '[data-component-id="mlflow.assistant.chat_panel.close"]'  # opens itself on a first visit
EXPAND_RUN = '[data-component-id$="runnamecellrenderer.tsx_46"]'  # a parent run's +: shows its task runs


def shoot(page, url: str, name: str, height: int = 950, click: str | None = None) -> None:
    """Opens `url`, closes the assistant panel, clicks `click` (a selector) if given, saves the PNG."""
    page.set_viewport_size({"width": 1500, "height": height})
    page.goto(url)
    page.wait_for_timeout(6000)  # the UI polls, so the network never idles
    close = page.locator(CLOSE_ASSISTANT)
    if close.count():
        close.first.click()
    if click:
        page.locator(click).first.click()
    page.wait_for_timeout(2000)
    page.screenshot(path=str(HERE / name))
    print(f"{name}: {url}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photograph(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    uri = f"sqlite:///{out / 'mlflow.db'}"
    address = f"http://127.0.0.1:{free_port()}"
    ui = subprocess.Popen([*MMCL, "ui", "--port", address.rsplit(":", 1)[1], "--tracking-uri", uri], cwd=ROOT,
                          start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                if requests.get(f"{address}/health", timeout=5).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("mfeat")
        parent = next(r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
        version = max(client.search_model_versions("name = 'mfeat-class-il-cmoe'"), key=lambda v: int(v.version))
        runs = f"{address}/#/experiments/{exp.experiment_id}/runs"
        run = f"{runs}/{parent.info.run_id}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page()
            shoot(page, f"{runs}?{VIEW}", "runs.png", 700, click=EXPAND_RUN)
            shoot(page, f"{run}/model-metrics?{VIEW}", "curves.png", 1500,  # only/: one point each, folded
                  click='text="only"')
            shoot(page, f"{run}/artifacts/acc_matrix.png?{VIEW}", "heatmap.png", 1000)
            shoot(page, f"{address}/#/models/mfeat-class-il-cmoe?{VIEW}", "model-versions.png", 800)
            shoot(page, f"{address}/#/models/mfeat-class-il-cmoe/versions/{version.version}?{VIEW}",
                  "version-lineage.png", 800)
            model_id = version.source.removeprefix("models:/")
            shoot(page, f"{address}/#/experiments/{exp.experiment_id}/models/{model_id}?{VIEW}",
                  "logged-model.png", 800)
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="a finished run's output folder (default: a fresh run)")
    args = parser.parse_args()
    if not shutil.which("chromium"):
        sys.exit("needs Debian's chromium: apt-get install chromium")
    if args.store:
        return photograph(args.store.resolve())
    out = Path(tempfile.mkdtemp(prefix="mmcl-screenshots-"))
    try:
        subprocess.run([*MMCL, "run", "--tasks", "3", "train.epochs=5", f"output_dir={out}"], cwd=ROOT, check=True)
        photograph(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
