"""Optional experiment tracking: training curves to TensorBoard, Weights & Biases or MLflow (off by default).

The one API every trainer calls (fine-tuning, probe sweeps, and any new trainer)::

    from cxrfair.tracking import open_tracker

    with open_tracker(config.track, log_dir, run_name, config_dict) as tracker:
        for ...:
            tracker.log(step, {"train/loss": loss, "train/lr": lr})   # step: int, never decreasing

- ``kind``: ``None`` (the default: a no-op tracker, nothing is written or imported) or a name in
  ``BACKENDS``: ``tensorboard`` (event files; the ``track`` extra), ``wandb``, ``mlflow`` (used
  when installed). ``check_backend(kind)`` refuses an unknown or uninstalled one with one
  CxrfairError line naming the ``pip install``; call it before any work (configs do).
- ``log_dir``: where the backend writes; the caller puts it inside the run's folder
  (``<run>/tracking/``, ``cxrfair.core.runs.TRACKING_DIR``), so ``--force``, the pipeline's
  publishing and stale-run moves carry it with the run. Tracking is never part of a run's
  identity: run.json, predictions and fingerprints are the same with it on or off.
- ``run_name``: the backend's name for the run (the cxrfair run id). ``config``: JSON-able
  settings, recorded once (TensorBoard: the HParams tab; wandb: ``config``; MLflow: params).
- ``Tracker.log(step, metrics)``: ``metrics`` maps a tag to anything ``float()`` takes (Python
  or NumPy numbers, 0-d tensors: converting a CUDA tensor waits for the device, so a trainer
  buffers per-step values and logs them at a point where it synchronises anyway). ``step`` must
  not decrease within one tracker (wandb's rule, held for every backend so curves read alike).
- Only the main process logs: under torchrun (``RANK`` not 0) ``open_tracker`` returns the no-op
  tracker, so a DDP trainer calls it on every process unchanged.

Offline by default: wandb runs in ``WANDB_MODE`` (``offline`` unless the environment says
otherwise; ``wandb sync`` uploads later) with its files under ``log_dir``; MLflow writes to the
``file:`` store ``log_dir/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set. TensorBoard's event
files are written with the ``tensorboard`` package alone (the format torch's ``SummaryWriter``
writes, without importing torch, which the JAX probe stage must not load).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from cxrfair.errors import CxrfairError

OPTION = "--track"  # the CLI option (docs/cli.md); the pipeline's key is `track` in [probe], [finetune] and [[contrastive]]


class _TensorBoard:
    """Event files (``events.out.tfevents.*``) in ``log_dir``, one scalar summary per metric."""

    def __init__(self, log_dir: Path, run_name: str, config: dict):
        # tensorboard's own writer and protos: what torch.utils.tensorboard.SummaryWriter wraps.
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import summary_v2 as hparams
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        self._writer = EventFileWriter(str(log_dir))
        if config:
            self._writer.add_event(Event(wall_time=time.time(), step=0, summary=hparams.hparams_pb(config)))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        values = [self._summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=self._summary(value=values)))

    def close(self) -> None:
        self._writer.close()


class _WandB:
    """A wandb run (offline unless ``WANDB_MODE`` says otherwise) with its files under ``log_dir``."""

    def __init__(self, log_dir: Path, run_name: str, config: dict):
        import wandb

        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cxrfair"), name=run_name, dir=str(log_dir),
                               config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class _MLflow:
    """An MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``cxrfair``), through a client
    (no global active run, so several trackers may be open at once)."""

    def __init__(self, log_dir: Path, run_name: str, config: dict):
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(log_dir).resolve() / "mlruns").as_uri()
        self._client = client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cxrfair")
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else client.create_experiment(name)
        self._run_id = client.create_run(experiment, run_name=run_name).info.run_id
        for key, value in config.items():
            client.log_param(self._run_id, key, value)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._client.log_metric(self._run_id, key, value, step=step)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


@dataclass(frozen=True)
class Backend:
    """One tracking library: the module that must import, how to install it, its writer."""

    name: str
    module: str  # imported to use it (and looked up, without importing, by ``check_backend``)
    install: str  # the fix named when it is missing
    writer: Callable[[Path, str, dict], Any]  # (log_dir, run_name, config) -> object with log(step, metrics), close()


BACKENDS = {b.name: b for b in (
    Backend("tensorboard", "tensorboard", "pip install cxrfair[track]", _TensorBoard),
    Backend("wandb", "wandb", "pip install wandb", _WandB),
    Backend("mlflow", "mlflow", "pip install mlflow", _MLflow),
)}
CHOICES = tuple(BACKENDS)


def check_backend(kind: str | None, option: str = OPTION) -> Backend | None:
    """The backend named ``kind`` (None: tracking off), refusing an unknown or uninstalled one.

    Cheap (a module lookup, no import), so configs call it while they are checked.
    """
    if kind is None:
        return None
    backend = BACKENDS.get(kind)
    if backend is None:
        raise CxrfairError(f"{option} {kind}: unknown tracking backend; choose one of {', '.join(CHOICES)}")
    try:
        found = importlib.util.find_spec(backend.module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise CxrfairError(f"{option} {kind}: the {backend.module} package is not installed; install it with "
                           f"`{backend.install}`, or leave tracking off")
    return backend


def main_process() -> bool:
    """False on torchrun's processes other than rank 0 (they train but do not log)."""
    return os.environ.get("RANK", "0") == "0"


class Tracker:
    """What a trainer logs to; inactive (every call a no-op) when tracking is off or on another rank."""

    def __init__(self, writer: Any = None, kind: str | None = None, log_dir: Path | None = None):
        self._writer, self.kind, self.log_dir = writer, kind, log_dir
        self._last = -math.inf

    @property
    def active(self) -> bool:
        """Whether ``log`` writes anything (a trainer may skip gathering values when not)."""
        return self._writer is not None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (tag -> number) at ``step`` (an int no smaller than the last one logged)."""
        if self._writer is None or not metrics:
            return
        step = int(step)
        if step < self._last:
            raise ValueError(f"tracker step {step} after step {self._last}: steps must not decrease")
        self._last = step
        self._writer.log(step, {str(k): float(v) for k, v in metrics.items()})

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tracker(kind: str | None, log_dir: Path | str, run_name: str,
                 config: Mapping[str, Any] | None = None) -> Tracker:
    """A tracker writing to ``log_dir`` (created) with backend ``kind``; the no-op tracker for None or
    a torchrun process other than rank 0. CxrfairError (one line) for an unknown or missing backend."""
    backend = check_backend(kind)
    if backend is None or not main_process():
        return Tracker()
    try:
        importlib.import_module(backend.module)
    except ImportError:
        raise CxrfairError(f"{OPTION} {kind}: the {backend.module} package cannot be imported; install it with "
                           f"`{backend.install}`, or leave tracking off") from None
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return Tracker(backend.writer(log_dir, run_name, flat_config(config or {})), kind, log_dir)


def flat_config(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """``config`` with every value a bool, int, float or str (others as JSON text), as every backend takes.

    None becomes ``"none"`` and NaN its text, which TensorBoard's HParams tab shows as written.
    """
    def plain(v: Any) -> bool | int | float | str:
        if isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v)):
            return v
        if v is None:
            return "none"
        if isinstance(v, float):
            return str(v)
        return json.dumps(v, default=str)

    return {str(k): plain(v) for k, v in config.items()}


__all__ = ["BACKENDS", "CHOICES", "OPTION", "Backend", "Tracker", "check_backend", "flat_config", "main_process",
           "open_tracker"]
