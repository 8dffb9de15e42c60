"""The HTML report in a real browser: every image loads and the console stays clean."""

import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from exactflow import plotting, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
]

# Added by the test only: counts loaded images and any error the page raises or logs.
PROBE = """<script>
let errors = 0;
window.addEventListener("error", () => { errors += 1; }, true);
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { errors += 1; original(...args); };
}
window.addEventListener("load", () => {
  const images = [...document.images];
  const loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.title = `PROBE images ${loaded}/${images.length} errors ${errors}`;
});
</script>"""

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's chromium)"
)


def _run_folder(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    plotting.samples([("data", rng.normal(size=(200, 2)))], 1, folder / "samples.png")
    plotting.loss_curve(np.arange(1, 6), {"train": np.linspace(3, 2, 5)}, folder / "loss.png")
    (folder / "results.md").write_text("| model | NLL |\n|---|---|\n| realnvp | 1.3 |\n")

    return report.write(folder)


def _chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr"]

    return subprocess.run(
        [*command, "--v=0", *arguments], capture_output=True, text=True, timeout=120
    )


def test_report_renders_with_every_image_loaded_and_no_console_errors(tmp_path: Path) -> None:
    page = _run_folder(tmp_path)
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))

    dom = _chromium(tmp_path, "--dump-dom", probed.as_uri())
    shot = tmp_path / "screenshot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())

    assert "PROBE images 2/2 errors 0" in dom.stdout, f"probe said: {dom.stdout[:300]}"
    assert ":CONSOLE" not in dom.stderr, "the page wrote to the console"
    pixels = matplotlib.image.imread(shot)
    assert pixels.std() > 0.01, "the screenshot is blank"


def test_probe_catches_a_broken_image(tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text(f"<html><body><img src='missing.png'>{PROBE}</body></html>")

    dom = _chromium(tmp_path, "--dump-dom", broken.as_uri())

    assert "PROBE images 0/1 errors 1" in dom.stdout, f"probe said: {dom.stdout[:300]}"
