"""The benchmark scripts run: a smoke run of each, checked for its table."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _start(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def _run(script: str, *args: str) -> str:
    done = _start(script, *args)
    assert done.returncode == 0, done.stderr[-2000:]

    return done.stdout


def test_train_speed_quick_prints_every_row() -> None:
    out = _run("train_speed.py", "--quick", "--steps", "4")

    for model, parameters in (("realnvp", "71,744"), ("planar", "160")):
        for implementation in ("reference", "exactflow", "exactflow, PyTorch passes"):
            row = f"| {model} | {implementation} | {parameters} |"
            assert row in out, out
    assert "500 × 500 grid" in out


def test_agreement_smoke_run_compares_both_implementations() -> None:
    out = _run("agreement.py", "--epochs", "1", "--seeds", "1", "--jobs", "1")

    for model, dataset in [("realnvp", "moons"), ("planar", "circles")]:
        assert f"| {model} | {dataset} | 0 |" in out, out


@pytest.mark.skipif(importlib.util.find_spec("zuko") is None, reason="zuko is not installed")
def test_nsf_against_zuko_smoke_run_prints_both() -> None:
    out = _run("nsf_vs_zuko.py", "--epochs", "1", "--seeds", "1", "--jobs", "1")

    assert "| zuko NSF (44,052 params) | exactflow nsf (35,106 params) |" in out, out
    for dataset in ("moons", "circles"):
        assert f"| {dataset} | 0 |" in out, out


@pytest.mark.skipif(importlib.util.find_spec("zuko") is not None, reason="zuko is installed")
def test_nsf_against_zuko_without_zuko_says_so_in_one_line() -> None:
    done = _start("nsf_vs_zuko.py", "--epochs", "1")

    assert done.returncode != 0
    message = "nsf_vs_zuko.py: zuko is not installed: pip install --no-deps zuko"
    assert done.stderr.strip() == message


def test_kde_baseline_prints_both_datasets() -> None:
    out = _run("kde_baseline.py", "--seeds", "1")

    for dataset in ("moons", "circles"):
        assert f"| {dataset} | 0 | " in out, out
    assert "best of 25" in out


def test_nsf_variants_smoke_run_prints_every_variant() -> None:
    out = _run("nsf_variants.py", "--epochs", "1", "--seeds", "100", "--jobs", "1")

    variants = ("short recipe", "average", "16 bins", "noise 0.03", "dropout 0.1", "GELU")
    for variant in (*variants, "mixture of 5", "40,000 rows, 1/10 the epochs"):
        assert f"| {variant} | 100 | " in out, out
