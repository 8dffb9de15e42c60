"""The benchmark scripts run: a smoke run of each, checked for its table."""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    return done.stdout


def test_train_speed_quick_prints_every_row() -> None:
    out = _run("train_speed.py", "--quick", "--steps", "4")

    for row in ("| realnvp | reference | 71,744 |", "| realnvp | exactflow | 71,744 |"):
        assert row in out, out
    for row in ("| planar | reference | 160 |", "| planar | exactflow | 160 |"):
        assert row in out, out
    assert "500 × 500 grid" in out


def test_agreement_smoke_run_compares_both_implementations() -> None:
    out = _run("agreement.py", "--epochs", "1", "--seeds", "1", "--jobs", "1")

    for model, dataset in [("realnvp", "moons"), ("planar", "circles")]:
        assert f"| {model} | {dataset} | 0 |" in out, out
