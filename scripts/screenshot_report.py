"""Render a report.html headless in Chromium and save a PNG screenshot, to see the page as a reader does.

    python scripts/screenshot_report.py runs/demo/report.html --out demo-report.png [--height 4000]

Needs Chromium (`--chromium PATH`, default: `chromium` or `chromium-browser` on PATH). As root, Chromium
refuses to start without `--no-sandbox`, which this script then adds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def find_chromium(given: str | None) -> str:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome"]):
        found = shutil.which(name) if name else None
        if found:
            return found
    sys.exit(f"Chromium not found ({given or 'chromium, chromium-browser, google-chrome'}); give --chromium PATH")


def screenshot(page: Path, out: Path, width: int, height: int, chromium: str) -> None:
    command = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", f"--screenshot={out.resolve()}",
               f"--window-size={width},{height}", page.resolve().as_uri()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium will not run as root with its sandbox
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not out.is_file():
        sys.exit(f"Chromium failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", type=Path, help="a report.html (or a run directory holding one)")
    parser.add_argument("--out", type=Path, default=Path("report.png"), help="the PNG to write (default: report.png)")
    parser.add_argument("--width", type=int, default=1280, help="window width in pixels (default: 1280)")
    parser.add_argument("--height", type=int, default=4000, help="window height in pixels (default: 4000)")
    parser.add_argument("--chromium", default=None, help="the Chromium executable (default: found on PATH)")
    args = parser.parse_args()
    page = args.page / "report.html" if args.page.is_dir() else args.page
    if not page.is_file():
        sys.exit(f"{page} is not a file")
    screenshot(page, args.out, args.width, args.height, find_chromium(args.chromium))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
