"""The report page in a real headless browser (Debian's Chromium, installed by scripts/setup_browser.sh):
the screenshot is not blank and shows the curves, the reliability bars and the leaderboard's marks, and
every image loaded (the page's own check, read from the DOM after the load event)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: scripts/setup_browser.sh installs Debian's package when run "
                             "as root with apt-get (./test.sh does); elsewhere install chromium to run this test")

C0_BLUE = (31, 119, 180)       # matplotlib's first line colour: the curves
BAR_ORANGE = (255, 165, 86)    # the reliability diagram's rows-per-bin bars: C1 at alpha 0.7 over white
BEST_GREEN = (223, 243, 226)   # the leaderboard's best-per-column cells (#dff3e2)


def chromium(tmp: Path, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
           *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def image_counts(tmp: Path, index: Path) -> tuple[int, int]:
    """(images, images that failed to load) as the page's load handler wrote them onto <body>."""
    dom = chromium(tmp, "--dump-dom", index.as_uri())
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    found = dict(re.findall(r'data-(images(?:-broken)?)="(\d+)"', body.group(0)))
    assert set(found) == {"images", "images-broken"}, body.group(0)
    return int(found["images"]), int(found["images-broken"])


def pixels_near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int(np.all(np.abs(img.astype(np.int16) - np.array(rgb, np.int16)) <= tol, axis=-1).sum())


def test_report_renders_in_chromium(full_report: tuple[Path, str], tmp_path: Path) -> None:
    index = full_report[0] / "index.html"
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,3000", index.as_uri())
    img = np.asarray(Image.open(shot).convert("RGB"))                  # (H, W, 3)
    assert img.shape == (3000, 1400, 3)
    assert img.std() > 20                                               # not one flat colour
    rgb = (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]   # (H, W)
    assert len(np.unique(rgb)) > 200                                    # text, lines, fills: many colours
    assert pixels_near(img, C0_BLUE) > 500, "no curves in the screenshot"
    assert pixels_near(img, BAR_ORANGE, tol=8) > 5000, "no reliability bars in the screenshot"
    assert pixels_near(img, BEST_GREEN, tol=3) > 200, "no leaderboard best-value cells in the screenshot"

    n_img = index.read_text().count("<img ")
    assert image_counts(tmp_path, index) == (n_img, 0)
    # the check itself: a report missing one figure file shows one broken image
    broken = tmp_path / "broken"
    shutil.copytree(index.parent, broken)
    (broken / "figures" / "run0_training.png").unlink()
    assert image_counts(tmp_path, broken / "index.html") == (n_img, 1)
