"""Regenerate ``docs/tensorboard_custom_scalars.png``: TensorBoard's Custom Scalars tab after two of the demo's runs.

Trains the demo's SGD-M and AdamW runs into a fresh folder, serves it with TensorBoard on a free port, and has
headless Chromium (``apt-get install chromium``) take the page as a user first sees it. Run from the repository
root with the ``examples`` extra installed::

    .venv/bin/python docs/screenshot.py            # writes docs/tensorboard_custom_scalars.png
    .venv/bin/python docs/screenshot.py --out x.png --size 1400,2600   # taller: the whole first category
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(out: Path, size: str, runs: list[str]) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("needs headless Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as logdir:
        subprocess.run(
            [sys.executable, ROOT / "examples" / "digits.py", "--logdir", logdir, "--runs", *runs], check=True
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        board = Path(sys.executable).with_name("tensorboard")
        server = subprocess.Popen(
            [board, "--logdir", logdir, "--port", str(port), "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(120):  # TensorBoard takes a few seconds to start and read the runs
                try:
                    urllib.request.urlopen(f"{url}/data/plugin/custom_scalars/layout", timeout=2).read()
                    break
                except OSError:
                    time.sleep(0.5)
            shot = [browser, "--headless=new", "--no-sandbox", "--hide-scrollbars", f"--window-size={size}"]
            shot += ["--virtual-time-budget=20000", f"--screenshot={out}", f"{url}/?darkMode=false#custom_scalars"]
            subprocess.run(shot, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            server.terminate()
            server.wait()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tensorboard_custom_scalars.png")
    parser.add_argument("--size", default="1400,1000", help="the browser window, width,height (default 1400,1000)")
    parser.add_argument("--runs", nargs="+", default=["sgdm", "adamw"], help="the demo's runs (default sgdm adamw)")
    args = parser.parse_args()
    main(args.out, args.size, args.runs)
