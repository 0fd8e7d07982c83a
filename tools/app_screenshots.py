"""Writes the README's screenshots of the interactive page, docs/images/app_sample.png and app_edit.png.

    .venv/app/bin/python -m tools.app_screenshots     # after `make test-app` (gradio, playwright, chromium)

It runs the browser test (tests/app) with KA_MIG_APP_SCREENSHOTS set to --out, so the pictures show exactly what
that test does (the demo weights, class 3, seed 7, a brushed region regenerated as class 6); a plain test run
writes its screenshots into a temporary folder only.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path


def main(argv=None) -> int:
    """Runs tests/app with the screenshots kept in --out; returns pytest's exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/images", help="folder for app_sample.png and app_edit.png")
    args = parser.parse_args(argv)
    env = {**os.environ, "KA_MIG_APP_SCREENSHOTS": str(Path(args.out).resolve()),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/app"], env=env)


if __name__ == "__main__":
    sys.exit(main())
