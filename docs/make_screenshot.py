"""Render the README's dashboard screenshots: real TensorBoard pages of demo runs, in headless Chromium.

Runs `hessdiag demo --scenario SCENARIO`, serves its log directory with TensorBoard on 127.0.0.1
and captures the custom-scalars dashboard at TensorBoard's defaults (smoothing 0.6, outliers
ignored: what a user sees first, and what each chart is laid out to be readable at) with Debian's
Chromium (`apt-get install chromium`). The README's two pictures:

    python docs/make_screenshot.py                                  # edge-of-stability, docs/dashboard.png
    python docs/make_screenshot.py --scenario healthy --out docs/dashboard-adam.png   # Adam
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("dashboard.png")))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--scenario", default="edge-of-stability")
    parser.add_argument("--height", type=int, default=1060, help="window height in pixels")
    args = parser.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="hessdiag-screenshot-"))
    subprocess.run([sys.executable, "-m", "hessdiag.app.cli", "demo", "--scenario", args.scenario, "--logdir", str(logdir)], check=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("TensorBoard did not start")
                time.sleep(0.5)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size=1600,{args.height}",
                    "--virtual-time-budget=20000", f"--screenshot={Path(args.out).resolve()}",
                    f"http://127.0.0.1:{port}/#custom_scalars",
                ],
                check=True, capture_output=True, timeout=180,
            )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
