"""The commands end to end: train, evaluate, sample, score, plot, report, resume, Ctrl-C.

Every expected number is computed here from the data or from the checkpoint's raw contents,
not read back from the code under test. Runs are tiny (a few hundred rows, a few epochs) and
torch is held to one thread: on a loaded two-core machine two threads run many times slower.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import make_moons

from exactflow import checkpoint, cli, workflow
from exactflow.models import build
from exactflow.train import Recipe, Trainer, TrainingDiverged, TrainingInterrupted

SHIFT = np.array([500.0, -20.0])
SCALE = np.array([40.0, 0.5])
ROWS = 300


pytestmark = pytest.mark.usefixtures("one_thread")


def _raw_rows(n: int = ROWS, seed: int = 0) -> np.ndarray:
    """Two moons moved far from the origin and scaled very differently per column."""
    x, _ = make_moons(n_samples=n, noise=0.1, random_state=seed)

    return x * SCALE + SHIFT


def _write_csv(path: Path, rows: np.ndarray, header: list[str] | None) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows.tolist())

    return path


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as file:
        lines = list(csv.reader(file))

    return lines[0], np.array(lines[1:], dtype=np.float64)


def _metrics(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()

    return code, out, err


def _child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _raw_payload(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _independent_nll(model: Path, rows: np.ndarray) -> np.ndarray:
    """Per-row NLL in raw units from the checkpoint's own mean and std (not the product's)."""
    flow, _, _ = checkpoint.load(model)
    payload = _raw_payload(model)
    mean = np.array(payload["standardizer"]["mean"])
    std = np.array(payload["standardizer"]["std"])
    z = torch.as_tensor((rows - mean) / std, dtype=torch.float32)
    flow.eval()
    with torch.no_grad():
        log_p_standardized = flow.log_prob(z).double().numpy()

    return -(log_p_standardized - np.log(std).sum())


@pytest.fixture(name="no_figures")
def no_figures_fixture(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Skip the figures train draws at the end (``test_plot_*`` covers them); record the call.

    Drawing them takes most of a tiny run's time, and the input-format tests only need the
    checkpoint.
    """
    calls: list[Path] = []

    def record(model: str | Path, *args: object, **kwargs: object) -> list[Path]:
        calls.append(Path(model))
        return []

    monkeypatch.setattr(workflow, "plot", record)

    return calls


@pytest.fixture(scope="module", name="trained")
def trained_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | np.ndarray]:
    """One run of ``exactflow train`` on a CSV with a header, shared by the read-only tests."""
    folder = tmp_path_factory.mktemp("commands")
    rows = _raw_rows()
    data = _write_csv(folder / "moons.csv", rows, ["east", "north"])
    out = folder / "run"
    code = cli.main(
        ["train", "--data", str(data), "--epochs", "3", "--out", str(out), "--no-progress"]
    )
    assert code == 0, "training the shared run failed"

    return {"data": data, "rows": rows, "out": out, "model": out / "model.pt"}


def test_train_on_csv_with_header_writes_the_run_folder(
    trained: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    out = trained["out"]
    for name in ("model.pt", "resume.pt", "metrics.csv", "settings.json", "loss.png"):
        assert (out / name).is_file(), f"train did not write {name}"
    epochs = [int(row["epoch"]) for row in _metrics(out)]
    assert epochs == [1, 2, 3], f"metrics.csv should list epochs 1..3, got {epochs}"
    payload = _raw_payload(trained["model"])
    assert payload["model"]["dim"] == 2, "the header row was taken for a data row"
    train_rows = round(ROWS * 0.9)
    assert len(payload["train_log_density"]) == train_rows, "expected a 90/10 split of 300 rows"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == ROWS and summary["validation_rows"] == ROWS - train_rows
    # The standardization is fitted in raw units: its mean is near the data's mean.
    mean = np.array(payload["standardizer"]["mean"])
    assert np.all(np.abs(mean - trained["rows"].mean(0)) < 0.2 * trained["rows"].std(0)), (
        f"standardizer mean {mean} is not the data mean {trained['rows'].mean(0)}"
    )


def test_train_on_csv_without_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_figures: list[Path]
) -> None:
    rows = _raw_rows(120, seed=1)
    data = _write_csv(tmp_path / "plain.csv", rows, None)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--model", "planar", "--epochs", "1"]
    code, stdout, err = _run(capsys, [*argv, "--out", str(out), "--no-progress"])

    assert code == 0, f"training on a CSV without header failed: {err}"
    assert "120 rows × 2 columns" in stdout, f"all 120 rows must be data rows: {stdout!r}"
    assert no_figures == [out / "model.pt"], "train must draw the figures of its model.pt"
    mean = np.array(_raw_payload(out / "model.pt")["standardizer"]["mean"])
    assert np.all(np.abs(mean - rows.mean(0)) < 0.2 * rows.std(0)), "first row lost or misread"


@pytest.mark.parametrize("kind", ["npy", "npz-x", "npz-single"])
def test_train_on_numpy_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_figures: list[Path], kind: str
) -> None:
    rows = _raw_rows(100, seed=2)
    if kind == "npy":
        data = tmp_path / "rows.npy"
        np.save(data, rows)
    elif kind == "npz-x":
        data = tmp_path / "rows.npz"
        np.savez(data, x=rows, labels=np.arange(100))
    else:
        data = tmp_path / "rows.npz"
        np.savez(data, points=rows)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--model", "planar", "--epochs", "1"]
    code, stdout, err = _run(capsys, [*argv, "--out", str(out), "--no-progress"])

    assert code == 0, f"training on {kind} failed: {err}"
    assert "100 rows × 2 columns" in stdout, f"wrong table read from {kind}: {stdout!r}"
    mean = np.array(_raw_payload(out / "model.pt")["standardizer"]["mean"])
    assert np.all(np.abs(mean - rows.mean(0)) < 0.2 * rows.std(0)), f"{kind} misread"


@pytest.mark.parametrize("columns", ["gamma,alpha", "3,1"])
def test_columns_by_name_and_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_figures: list[Path], columns: str
) -> None:
    rng = np.random.default_rng(3)
    table = np.column_stack(
        [rng.normal(-100.0, 1.0, 100), rng.normal(0.0, 50.0, 100), rng.normal(7.0, 0.1, 100)]
    )
    data = _write_csv(tmp_path / "three.csv", table, ["alpha", "beta", "gamma"])
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--columns", columns, "--model", "planar"]
    code, _, err = _run(capsys, [*argv, "--epochs", "1", "--out", str(out), "--no-progress"])

    assert code == 0, f"--columns {columns} failed: {err}"
    payload = _raw_payload(out / "model.pt")
    assert payload["model"]["dim"] == 2, "two columns were chosen"
    mean = np.array(payload["standardizer"]["mean"])
    assert abs(mean[0] - 7.0) < 0.1, f"first chosen column should be gamma (≈7), got {mean}"
    assert abs(mean[1] + 100.0) < 0.5, f"second chosen column should be alpha (≈-100), got {mean}"

    # evaluate with the same choice reads the same two columns in the same order.
    code, stdout, err = _run(
        capsys, ["evaluate", str(out / "model.pt"), "--data", str(data), "--columns", columns]
    )
    assert code == 0, f"evaluate --columns failed: {err}"
    assert stdout.startswith("100 rows"), f"evaluate read the wrong rows: {stdout!r}"


def test_config_file_with_a_flag_overriding_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_figures: list[Path]
) -> None:
    data = _write_csv(tmp_path / "rows.csv", _raw_rows(100, seed=4), ["a", "b"])
    out = tmp_path / "run"
    config = tmp_path / "train.toml"
    config.write_text(
        f"data = {json.dumps(str(data))}\n"
        f"out = {json.dumps(str(out))}\n"
        'model = "planar"\n'
        "epochs = 3\n"
        "batch-size = 32\n"
        "weight-decay = 0.02\n"
        "seed = 5\n"
    )
    code, _, err = _run(
        capsys, ["train", "--config", str(config), "--epochs", "2", "--no-progress"]
    )

    assert code == 0, f"training from a config file failed: {err}"
    settings = json.loads((out / "settings.json").read_text())
    assert settings["recipe"]["epochs"] == 2, "the --epochs flag must win over the config"
    assert settings["recipe"]["batch_size"] == 32, "batch-size from the config was lost"
    assert settings["recipe"]["weight_decay"] == 0.02, "weight-decay from the config was lost"
    assert settings["model"] == "planar" and settings["seed"] == 5, "config values were lost"
    assert len(_metrics(out)) == 2, "the run must stop after the flag's 2 epochs"


def test_evaluate_matches_an_independent_nll(
    trained: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = _run(
        capsys, ["evaluate", str(trained["model"]), "--data", str(trained["data"]), "--json"]
    )
    assert code == 0, f"evaluate failed: {err}"
    result = json.loads(stdout)
    nll = _independent_nll(trained["model"], trained["rows"])

    assert result["rows"] == ROWS, "evaluate must score every row"
    assert result["nll_mean"] == pytest.approx(nll.mean(), abs=1e-4), "NLL not in raw units"
    assert result["nll_median"] == pytest.approx(np.median(nll), abs=1e-4), "median differs"
    se = nll.std(ddof=1) / math.sqrt(len(nll))
    assert result["nll_se"] == pytest.approx(se, rel=1e-3), "standard error differs"

    code, stdout, _ = _run(
        capsys, ["evaluate", str(trained["model"]), "--data", str(trained["data"])]
    )
    assert code == 0 and "bits per dimension" in stdout, f"text output incomplete: {stdout!r}"


def test_evaluate_bits_per_dimension(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = _run(
        capsys, ["evaluate", str(trained["model"]), "--data", str(trained["data"]), "--json"]
    )
    result = json.loads(stdout)
    expected = result["nll_mean"] / (2 * math.log(2.0))

    assert code == 0
    assert result["bits_per_dim"] == pytest.approx(expected, rel=1e-12), (
        f"bits per dimension {result['bits_per_dim']} is not nll_mean / (d ln 2) = {expected}"
    )


def test_sample_is_in_the_data_units(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "samples.csv"
    code, _, err = _run(
        capsys, ["sample", str(trained["model"]), "-n", "2000", "--out", str(path)]
    )
    assert code == 0, f"sample failed: {err}"
    header, samples = _read_csv(path)
    rows = trained["rows"]

    assert header == ["east", "north"], "samples carry the training column names"
    assert samples.shape == (2000, 2), "expected 2000 rows × 2"
    assert np.isfinite(samples).all(), "samples must be finite"
    gap = np.abs(samples.mean(0) - rows.mean(0)) / rows.std(0)
    assert np.all(gap < 0.5), f"sample mean {samples.mean(0)} is far from {rows.mean(0)}"
    ratio = samples.std(0) / rows.std(0)
    assert np.all((ratio > 0.5) & (ratio < 2.0)), f"sample spread off by {ratio}"


def test_sample_temperature_and_npy_output(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spreads = {}
    for temperature in ("0", "0.3", "1"):
        path = tmp_path / f"t{temperature}.npy"
        argv = ["sample", str(trained["model"]), "-n", "500", "--out", str(path)]
        code, _, err = _run(capsys, [*argv, "--temperature", temperature, "--seed", "1"])
        assert code == 0, f"sample --temperature {temperature} failed: {err}"
        samples = np.load(path)
        assert samples.shape == (500, 2), "a .npy of 500 rows × 2 expected"
        assert np.isfinite(samples).all(), f"temperature {temperature} gave non-finite samples"
        spreads[temperature] = samples.std(0) / trained["rows"].std(0)
        if temperature == "0":
            assert (samples == samples[0]).all(), "temperature 0 maps every draw to one point"

    assert np.all(spreads["0.3"] < spreads["1"]), f"a lower temperature must shrink: {spreads}"


def test_score_writes_log_density_and_outlier_flags(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "scores.csv"
    argv = ["score", str(trained["model"]), "--data", str(trained["data"]), "--out", str(path)]
    code, _, err = _run(capsys, [*argv, "--quantile", "0.1"])
    assert code == 0, f"score failed: {err}"
    header, table = _read_csv(path)

    assert header == ["row", "log_density", "is_outlier"], f"unexpected columns {header}"
    assert table.shape == (ROWS, 3), "one row of scores per data row"
    np.testing.assert_array_equal(table[:, 0], np.arange(1, ROWS + 1))
    table = table[:, 1:]
    np.testing.assert_allclose(
        table[:, 0], -_independent_nll(trained["model"], trained["rows"]), atol=1e-4
    )
    flags = table[:, 1]
    assert set(np.unique(flags)) <= {0.0, 1.0}, "is_outlier must be 0 or 1"
    share = flags.mean()
    # 270 training rows set the 10% threshold; the 30 validation rows may add a few.
    assert 0.05 <= share <= 0.2, f"{share:.3f} of rows flagged at quantile 0.1"
    flagged, kept = table[flags == 1, 0], table[flags == 0, 0]
    assert flagged.max() < kept.min(), "every flagged row must be less likely than every other"


def test_plot_writes_the_figures(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = tmp_path / "figures"
    code, _, err = _run(capsys, ["plot", str(trained["model"]), "--out", str(figures)])

    assert code == 0, f"plot failed: {err}"
    for name in ("heatmap.png", "transformation.png", "samples.png", "loss.png"):
        path = figures / name
        assert path.is_file(), f"plot did not write {name}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"


def test_report_embeds_the_figures(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = trained["out"]
    (out / "report.html").unlink(missing_ok=True)
    code, _, err = _run(capsys, ["report", str(out)])

    assert code == 0, f"report failed: {err}"
    page = (out / "report.html").read_text(encoding="utf-8")
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures, "the run folder should hold figures"
    prefix = 'src="data:image/png;base64,'
    assert page.count(prefix) == len(figures), "every figure must be embedded as a data: URI"
    for name in figures:
        assert f'src="{name}"' not in page, f"{name} is linked, not embedded"
    first = page.split(prefix, 1)[1].split('"', 1)[0]
    assert base64.b64decode(first)[:4] == b"\x89PNG", "the embedded data is not a PNG"


def test_density_in_raw_units_is_normalised(trained: dict) -> None:
    flow, standardizer, _ = checkpoint.load(trained["model"])
    rows = trained["rows"]
    mean, std = rows.mean(0), rows.std(0)
    n = 401
    xs = np.linspace(mean[0] - 7 * std[0], mean[0] + 7 * std[0], n)
    ys = np.linspace(mean[1] - 7 * std[1], mean[1] + 7 * std[1], n)
    xx, yy = np.meshgrid(xs, ys)
    grid = np.column_stack([xx.ravel(), yy.ravel()])
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])

    log_p = workflow.log_density(flow, standardizer, grid)
    mass = float(np.exp(log_p).sum() * cell)

    assert abs(std.prod() - 1.0) > 0.5, "the scaling must matter for this test to bite"
    assert mass == pytest.approx(1.0, abs=0.01), f"raw-units density integrates to {mass}"


def _settings(data: Path, out: Path, epochs: int, seed: int = 0) -> workflow.TrainSettings:
    return workflow.TrainSettings(
        out=str(out), data=str(data), recipe=Recipe(epochs=epochs, batch_size=64), seed=seed
    )


def _stop_after(epoch: int) -> object:
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) == epoch

    return stop


def _state(path: Path) -> dict[str, torch.Tensor]:
    return _raw_payload(path)["state"]


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _losses(folder: Path) -> list[tuple[str, ...]]:
    return [
        (r["epoch"], r["loss"], r["train_nll"], r["val_nll"], r["lr"]) for r in _metrics(folder)
    ]


def test_resume_is_exact(tmp_path: Path) -> None:
    data = _write_csv(tmp_path / "rows.csv", _raw_rows(200, seed=5), ["a", "b"])
    straight, split = tmp_path / "straight", tmp_path / "split"
    workflow.train(_settings(data, straight, 6), progress=False)
    with pytest.raises(TrainingInterrupted):
        workflow.train(_settings(data, split, 6), progress=False, stop=_stop_after(3))
    interrupted = _raw_payload(split / "resume.pt")
    assert interrupted["training"]["epoch"] == 3, "the stop after epoch 3 was not honoured"

    summary = workflow.resume(split / "resume.pt", progress=False)

    assert summary["epochs_done"] == 6, "the resumed run must finish all 6 epochs"
    final_a = _raw_payload(straight / "resume.pt")["training"]["model"]
    final_b = _raw_payload(split / "resume.pt")["training"]["model"]
    _assert_same_tensors(final_a, final_b, "final weights")
    _assert_same_tensors(_state(straight / "model.pt"), _state(split / "model.pt"), "best weights")
    assert _losses(straight) == _losses(split), "metrics.csv losses differ after resuming"


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    total = 100
    data = _write_csv(tmp_path / "rows.csv", _raw_rows(60, seed=6), ["a", "b"])
    out = tmp_path / "run"
    command = [sys.executable, "-m", "exactflow.cli", "train", "--data", str(data)]
    command += ["--epochs", str(total), "--out", str(out), "--no-progress"]
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env()
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "resume.pt").exists():
            assert child.poll() is None, f"train ended early: {child.communicate()}"
            assert time.monotonic() < deadline, "resume.pt did not appear within 60 s"
            time.sleep(0.01)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert child.returncode == 130, f"Ctrl-C should exit with 130, got {child.returncode}: {err}"
    assert "Traceback" not in err, f"Ctrl-C printed a traceback: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("exactflow:") for line in lines), f"stray stderr: {err!r}"
    reports = [line for line in lines if "interrupted" in line]
    assert len(reports) == 1 and "--resume" in reports[0], f"one-line report expected: {err!r}"
    _, _, payload = checkpoint.load(out / "resume.pt")
    assert 25 <= payload["training"]["epoch"] < total, "resume.pt must hold a partial run"

    monkeypatch.setattr(workflow, "plot", lambda *args, **kwargs: [])  # figures: test_plot_*
    code = cli.main(["train", "--resume", str(out / "resume.pt"), "--no-progress"])

    assert code == 0, "the resumed run must finish"
    epochs = [int(row["epoch"]) for row in _metrics(out)]
    assert epochs == list(range(1, total + 1)), "metrics.csv must list every epoch once"


class _Poison:
    """Wrap ``workflow.build`` to keep the first model built, and poison it after an epoch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
        self.flows: list = []
        self.epoch = epoch
        self.calls = 0
        build = workflow.build

        def capturing(*args: object, **kwargs: object) -> object:
            flow = build(*args, **kwargs)
            self.flows.append(flow)
            return flow

        monkeypatch.setattr(workflow, "build", capturing)

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls == self.epoch:
            with torch.no_grad():
                next(self.flows[0].parameters()).fill_(math.inf)
        return False


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _write_csv(tmp_path / "rows.csv", _raw_rows(200, seed=7), ["a", "b"])
    reference = tmp_path / "reference"
    with pytest.raises(TrainingInterrupted):
        workflow.train(_settings(data, reference, 10), progress=False, stop=_stop_after(3))
    poison = _Poison(monkeypatch, epoch=3)
    out = tmp_path / "run"

    with pytest.raises(TrainingDiverged) as raised:
        workflow.train(_settings(data, out, 10), progress=False, stop=poison)

    message = str(raised.value)
    assert "epoch 4" in message and "step 1" in message, f"message lacks epoch/step: {message}"
    flow, _, payload = checkpoint.load(out / "model.pt")
    assert all(torch.isfinite(p).all() for p in flow.state_dict().values()), "model.pt not finite"
    assert 1 <= payload["info"]["best_epoch"] <= 3, "model.pt must hold an epoch before the NaN"
    _assert_same_tensors(_state(reference / "model.pt"), _state(out / "model.pt"), "best weights")
    assert len(_metrics(out)) == 3, "metrics.csv should hold the 3 finished epochs"


def test_non_finite_training_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_csv(tmp_path / "rows.csv", _raw_rows(200, seed=8), ["a", "b"])
    run_epoch = Trainer.run_epoch

    def poisoned(self: Trainer) -> object:
        record = run_epoch(self)
        if self.epoch == 2:
            with torch.no_grad():
                next(self.flow.parameters()).fill_(math.nan)
        return record

    monkeypatch.setattr(Trainer, "run_epoch", poisoned)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--epochs", "5", "--out", str(out), "--no-progress"]
    code, _, err = _run(capsys, argv)

    assert code != 0, "a diverged run must not exit 0"
    assert "Traceback" not in err, f"traceback on divergence: {err}"
    assert len(err.strip().splitlines()) == 1, f"expected a one-line message: {err!r}"
    assert "epoch 3" in err and "step 1" in err, f"message must name epoch and step: {err!r}"
    flow, _, _ = checkpoint.load(out / "model.pt")
    assert all(torch.isfinite(p).all() for p in flow.state_dict().values()), "model.pt not finite"


def test_columns_skip_text_and_scoring_matches_columns_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(120, 2)) * [2.0, 50.0] + [10.0, 300.0]
    data = tmp_path / "stations.csv"
    with data.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["station", "a", "b"])
        writer.writerows([f"S{i}", x, y] for i, (x, y) in enumerate(rows))
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--columns", "a,b", "--out", str(out)]
    code, _, err = _run(capsys, [*argv, "--epochs", "2", "--no-progress"])
    assert code == 0, f"a text column outside --columns must not matter: {err}"

    swapped = tmp_path / "swapped.csv"
    with swapped.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["b", "a"])
        writer.writerows(rows[:, ::-1].tolist())
    results = []
    for path in (data, swapped):
        code, text, err = _run(capsys, ["evaluate", str(out / "model.pt"), "--data", str(path)])
        assert code == 0, err
        results.append(text.split("NLL")[1].split()[0])
    assert results[0] == results[1], "columns must be matched by name, whatever their order"

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,c\n1,2\n3,4\n")
    code, _, err = _run(capsys, ["evaluate", str(out / "model.pt"), "--data", str(wrong)])
    assert code == 2 and "no column named 'b'" in err and "Traceback" not in err


def test_load_distribution_scores_like_evaluate(trained: dict) -> None:
    density = workflow.load_distribution(trained["model"])
    flow, standardizer, _ = checkpoint.load(trained["model"])
    rows = trained["rows"][:50]

    expected = workflow.log_density(flow, standardizer, rows)
    got = density.log_prob(torch.as_tensor(rows)).detach().double().numpy()

    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert density.sample((7,)).shape == (7, rows.shape[1])


def _tamper_moments(state: dict) -> None:
    moments = state["optimizer"]["state"][0]
    moments["exp_avg"] = moments["exp_avg"][:10].clone()


def _expand_moments(state: dict) -> None:
    """Moments that are one value seen n times: a write through them would overrun it."""
    moments = state["optimizer"]["state"][0]
    for key in ("exp_avg", "exp_avg_sq"):
        moments[key] = torch.zeros(1).expand(moments[key].numel())


def _tamper_group(state: dict) -> None:
    state["optimizer"]["param_groups"][0]["weight_decay"] = 0.5


def _tamper_model(state: dict) -> None:
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name][:1]


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda s: s.update(layout=list(reversed(s["layout"]))), "orders the parameters"),
        (lambda s: s.pop("optimizer"), "entries are not this trainer's"),
        (_tamper_moments, "moments do not match"),
        (lambda s: s["optimizer"]["state"][0].update(exp_avg_sq=torch.zeros(3, 3)), "moments"),
        (_tamper_group, "optimizer settings differ"),
        (lambda s: s.update(epoch=10**6), "epoch 1000000"),
        (lambda s: s.update(epoch=-5), "epoch -5"),
        (lambda s: s.update(epoch="x"), "epoch 'x'"),
        (lambda s: s.update(best_epoch=3), "best epoch 3"),
        (lambda s: s.update(history=[{"foo": 1}, {"foo": 2}]), "history"),
        (lambda s: s.update(generator=torch.zeros(3)), "generator"),
        (_tamper_model, "model does not match"),
        (lambda s: s.update(best_state={}), "best_state does not match"),
        (_expand_moments, "moments do not match"),
        (lambda s: s["optimizer"]["state"][0]["step"].fill_(math.inf), "step count inf"),
        (lambda s: s["optimizer"]["state"][0]["step"].fill_(1e30), "step count"),
        (lambda s: s["optimizer"]["state"][0]["step"].fill_(-5), "step count -5"),
        (lambda s: s["optimizer"]["state"][0]["step"].fill_(2.5), "step count 2.5"),
        (lambda s: s["optimizer"].update(state={5: s["optimizer"]["state"][0]}), "for its epochs"),
        (lambda s: s["optimizer"].update(state={}), "for its epochs"),
        (lambda s: s["generator"].random_(0, 256), "generator"),
        (lambda s: s.update(best_nll=math.nan), "best NLL nan"),
        (lambda s: s["model"]["layers.0.nets.scale.0.0.bias"].fill_(math.nan), "not finite"),
        (lambda s: s["optimizer"]["state"][0]["exp_avg"].fill_(math.nan), "not finite"),
        (lambda s: s["optimizer"]["state"][0]["exp_avg_sq"].fill_(-1.0), "moment is negative"),
    ],
)
def test_a_damaged_training_state_is_refused_and_changes_nothing(tamper, needle: str) -> None:
    rows = torch.as_tensor(_raw_rows(64) / SCALE, dtype=torch.float32)
    trainer = Trainer(build("realnvp", 2), rows, Recipe(epochs=4), seed=0)
    trainer.run_epoch()
    trainer.run_epoch()
    state = trainer.state_dict()
    tamper(state)
    other = Trainer(build("realnvp", 2), rows, Recipe(epochs=4), seed=1)
    before = other.flat.detach().clone()

    with pytest.raises(ValueError, match=needle):
        other.load_state_dict(state)

    assert torch.equal(other.flat, before) and other.epoch == 0, "a refused state was loaded"


def test_resume_from_another_folder_names_the_relative_data_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    _write_csv(start / "rows.csv", _raw_rows(100, seed=6), ["a", "b"])
    monkeypatch.chdir(start)
    with pytest.raises(TrainingInterrupted):
        workflow.train(_settings(Path("rows.csv"), start / "run", 4), False, _stop_after(1))
    model = (start / "run" / "model.pt").read_bytes()

    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match=r"'rows\.csv' is not found from .*resume from there"):
        workflow.resume(start / "run" / "resume.pt", progress=False)
    assert (start / "run" / "model.pt").read_bytes() == model, "a failed resume changed model.pt"

    monkeypatch.chdir(start)
    assert workflow.resume(start / "run" / "resume.pt", progress=False)["epochs_done"] == 4
