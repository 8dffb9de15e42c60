"""Checkpoints: weights, buffers and the settings that made them, with no pickled objects."""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exactflow import __version__
from exactflow.data import Standardizer
from exactflow.flow import Flow
from exactflow.models import build

FORMAT = "exactflow-checkpoint"
FORMAT_VERSION = 1
REQUIRED = frozenset(
    {"format", "format_version", "versions", "model", "state", "standardizer", "info"}
)
OPTIONAL = frozenset({"training", "train_log_density"})


class CheckpointError(ValueError):
    """Raised when a file is not a checkpoint this version of exactflow can load."""


def save(
    path: str | Path,
    flow: Flow,
    model: dict[str, Any],
    standardizer: Standardizer,
    info: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    train_log_density: torch.Tensor | None = None,
) -> None:
    """Write a checkpoint atomically: a crash mid-write leaves any older file at ``path`` intact.

    Args:
        path: where to write.
        flow: the model whose weights and buffers are stored.
        model: the builder settings, ``{"name": ..., "dim": ..., "options": {...}}``.
        standardizer: the standardization fitted on the training data.
        info: plain settings and results to keep beside the weights (recipe, seed, dataset).
        training: the trainer's state, for a checkpoint that can resume its run.
        train_log_density: the log-densities of the training rows, for outlier thresholds.
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"exactflow": __version__, "torch": str(torch.__version__)},
        "model": model,
        "state": {name: value.detach().cpu() for name, value in flow.state_dict().items()},
        "standardizer": {
            "mean": standardizer.mean.tolist(),
            "std": standardizer.std.tolist(),
        },
        "info": info or {},
    }
    if training is not None:
        payload["training"] = training
    if train_log_density is not None:
        payload["train_log_density"] = train_log_density.detach().cpu()

    # Write beside the target, flush to disk, then rename over it in one step.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> tuple[Flow, Standardizer, dict[str, Any]]:
    """Load a checkpoint without unpickling any object; return the model in evaluation mode.

    Returns:
        The flow, its standardization, and the checkpoint's plain data (settings, versions).

    Raises:
        CheckpointError: when the file is missing, unreadable, holds anything but plain data,
            has missing or unexpected keys, or comes from an incompatible format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with warnings.catch_warnings():
            # A plain pickle gets a warning about its protocol before the refusal below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{str(path)!r} is not an exactflow checkpoint: it is not a torch file of tensors "
            "and plain data, the only kind exactflow loads"
        ) from None
    except EOFError:
        raise CheckpointError(
            f"{str(path)!r} is not a loadable exactflow checkpoint: it is empty or cut short"
        ) from None
    except Exception as error:
        # The weights-only loader runs no code, but a file of another kind can stop it with
        # any exception (IndexError, KeyError, ... on arbitrary bytes): all mean "not ours".
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = detail if len(detail) <= 80 else detail[:77] + "..."
        raise CheckpointError(
            f"{str(path)!r} is not a loadable exactflow checkpoint: it is damaged or of "
            f"another kind ({detail or type(error).__name__})"
        ) from None

    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an exactflow checkpoint")
    missing, unexpected = REQUIRED - payload.keys(), payload.keys() - REQUIRED - OPTIONAL
    if missing or unexpected:
        raise CheckpointError(
            f"{str(path)!r} has missing keys {sorted(missing)} and unexpected keys "
            f"{sorted(unexpected)}"
        )
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has format version {payload['format_version']!r}; this exactflow "
            f"reads version {FORMAT_VERSION}"
        )

    try:
        flow, standardizer = _restore(payload)
    except CheckpointError as error:
        raise CheckpointError(f"{str(path)!r} {error}") from None

    return flow, standardizer, payload


def _check_plain_data(payload: dict[str, Any]) -> None:
    """Check the plain data beside the weights, which the commands read."""
    info = payload["info"]
    if not isinstance(info, dict):
        raise CheckpointError("has info that is not a table of settings")
    columns = info.get("columns")
    if columns is not None and not (
        isinstance(columns, list) and all(isinstance(c, str) for c in columns)
    ):
        raise CheckpointError("has column names that are not a list of names")
    if not isinstance(info.get("settings", {}), dict):
        raise CheckpointError("has training settings that are not a table")
    log_density = payload.get("train_log_density")
    if log_density is not None and not (
        isinstance(log_density, torch.Tensor)
        and log_density.dim() == 1
        and log_density.numel() > 0
        and log_density.is_floating_point()
        and not log_density.isnan().any()
    ):
        raise CheckpointError("has training log-densities that are not one number per row")
    state = payload["state"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError("has weights that are not a table of tensors")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"has non-finite values in {name}")
        if name.endswith("running_var") and not (tensor > 0).all():
            raise CheckpointError(f"has a non-positive variance in {name}")


def _build(model: Any, state: dict[str, torch.Tensor]) -> Flow:
    """Build the model a checkpoint names, its size bounded by the weights it carries.

    Every option must be a whole number no larger than the widest tensor or the number of
    tensors, and the model is first built without memory to compare its tensors' shapes.
    """
    try:
        name, dim, options = model["name"], model["dim"], model.get("options", {})
        bound = max([len(state), *(max(t.shape, default=1) for t in state.values())])
        values = [dim, *options.values()]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError("its dimension and options must be whole numbers")
        if not all(1 <= v <= bound for v in values):
            raise ValueError(f"its dimension and options {values} do not fit its weights")
        with torch.device("meta"):
            expected = build(name, dim, **options).state_dict()
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"names a model that cannot be built ({error})") from None
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"does not match model {name!r}: missing weights {missing}, unexpected weights "
            f"{unexpected}"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"does not match model {name!r}: size mismatch for {key}: "
                f"{tuple(state[key].shape)} in the file, {tuple(tensor.shape)} in the model"
            )
        if state[key].is_floating_point() != tensor.is_floating_point():
            raise CheckpointError(
                f"does not match model {name!r}: {key} holds {state[key].dtype} values, the "
                f"model {tensor.dtype}"
            )

    return build(name, dim, **options)


def _restore(payload: dict[str, Any]) -> tuple[Flow, Standardizer]:
    """Build the model a checkpoint names, load its weights, and read its standardization."""
    _check_plain_data(payload)
    model = payload["model"]
    flow = _build(model, payload["state"])
    try:
        flow.load_state_dict(payload["state"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"does not match model {model['name']!r}: {str(error).splitlines()[-1]}"
        ) from None
    flow.eval()
    columns = payload["info"].get("columns")
    if columns is not None and len(columns) != flow.dim:
        raise CheckpointError(f"names {len(columns)} columns for a model of dimension {flow.dim}")

    try:
        mean = np.asarray(payload["standardizer"]["mean"], dtype=np.float64)
        std = np.asarray(payload["standardizer"]["std"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"has no usable standardization ({error})") from None
    if mean.shape != (flow.dim,) or std.shape != (flow.dim,):
        raise CheckpointError(
            f"has a standardization of shapes {mean.shape} and {std.shape} for a model of "
            f"dimension {flow.dim}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise CheckpointError("has a standardization with non-finite or non-positive values")

    return flow, Standardizer(mean=mean, std=std)
