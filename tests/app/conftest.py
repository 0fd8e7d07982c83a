"""The page in a real browser: app.py on a free localhost port, headless Debian Chromium driven by Playwright.

Run by `make test-app` (which installs requirements-app.txt into .venv/app and Chromium if needed); `make test`
does not collect this folder (it needs gradio and a browser).
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("KA_MIG_CHROMIUM", "/usr/bin/chromium")
START_TIMEOUT_S = 120


def free_port() -> int:
    """A localhost port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, log: Path):
    """Returns once `url` answers 200; fails with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with status {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not serve {url} within {START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """URL of app.py --weights demo on a free 127.0.0.1 port (one process for the whole session)."""
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    import torch
    # the server computes with as many threads as this process, whose library calls are the test's oracle
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(log.parent / "gradio")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--weights", "demo", "--port", str(port)], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's package; Playwright downloads no browser)."""
    from playwright.sync_api import sync_playwright
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test-app` installs Debian's chromium package")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()
