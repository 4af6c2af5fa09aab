"""Where a run's epochs are logged beside log.csv: TensorBoard (whenever it is installed, events in
the run folder), and Weights & Biases or MLflow when a run asks for them (``--logger``, each an
extra). Every logger gets the run's hyperparameters once, then each epoch's figures under the
same names:

- ``train/loss``, ``train/lr``, ``train/temperature``, ``train/pairs_per_s`` and one
  ``train/<part>`` per loss part of the head;
- ``val/R1``, ``val/R5``, ``val/R10``, ``val/MdR`` (the validation metrics, as `avr eval`
  computes them);
- ``test/R1`` ... from `avr eval` (``log_test_metrics``), at the run's best epoch.

TensorBoard's hyperparameters are written as its HParams plugin reads them, so runs and sweep
trials (stacked ones too) can be compared in its HParams view.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from avr.errors import AvrError
from avr.extras import require

LOGGERS = ("tensorboard", "wandb", "mlflow")
VAL_METRICS = {"R1": "val_r1", "R5": "val_r5", "R10": "val_r10", "MdR": "val_mdr"}


def epoch_figures(log) -> dict[str, float]:
    """An ``EpochLog`` under the loggers' names."""
    figures = {"train/loss": log.loss, "train/lr": log.lr, "train/temperature": log.temperature,
               "train/pairs_per_s": log.pairs_per_s}
    figures.update({f"train/{name}": value for name, value in log.parts.items()})
    figures.update({f"val/{name}": getattr(log, field) for name, field in VAL_METRICS.items()})
    return figures


def hparams_of(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config.json ``train`` table and head options as flat scalar hyperparameters."""
    flat = {"head": config["head"]}
    for scope in ("train", "head_options"):
        for key, value in config.get(scope, {}).items():
            if key == "head_options" or value is None:
                continue
            flat[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))

    def start(self, hparams: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        metrics = {f"val/{name}": 0.0 for name in VAL_METRICS}
        metrics.update({f"test/{name}": 0.0 for name in VAL_METRICS})
        for summary in hparams_summaries(hparams, metrics):
            self.writer.file_writer.add_summary(summary)

    def epoch(self, epoch: int, figures: dict[str, float]) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run named after the run folder, its files under it (``WANDB_MODE=offline`` runs
    without a server; ``WANDB_PROJECT`` names the project, default ``avr``)."""

    def __init__(self, run_dir: Path):
        self.wandb = require("wandb", "--logger wandb")
        self.run_dir = run_dir

    def start(self, hparams: dict[str, Any]) -> None:
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "avr"),
                                   name=self.run_dir.name, dir=str(self.run_dir),
                                   config=hparams, reinit="finish_previous")

    def epoch(self, epoch: int, figures: dict[str, float]) -> None:
        self.run.log({**figures, "epoch": epoch})

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """An MLflow run named after the run folder, in the tracking store MLflow is set up for
    (``MLFLOW_TRACKING_URI``; a local ``mlruns`` folder by default)."""

    def __init__(self, run_dir: Path):
        self.mlflow = require("mlflow", "--logger mlflow")
        self.run_dir = run_dir

    def start(self, hparams: dict[str, Any]) -> None:
        self.run = self.mlflow.start_run(run_name=self.run_dir.name)
        self.mlflow.log_params(hparams)

    def epoch(self, epoch: int, figures: dict[str, float]) -> None:
        self.mlflow.log_metrics({name.replace("/", "_"): value
                                 for name, value in figures.items()}, step=epoch)

    def close(self) -> None:
        self.mlflow.end_run()


KINDS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}


class RunLoggers:
    """The loggers of one run: TensorBoard when installed, plus the ones asked for."""

    def __init__(self, run_dir: Path, config: dict[str, Any], asked: tuple[str, ...] = ()):
        unknown = [name for name in asked if name not in KINDS]
        if unknown:
            raise AvrError(f"--logger {unknown[0]}: choose among {', '.join(LOGGERS)}")
        names = list(dict.fromkeys(asked))
        if "tensorboard" not in names and tensorboard_installed():
            names.insert(0, "tensorboard")
        self.loggers = [KINDS[name](run_dir) for name in names]
        hparams = hparams_of(config)
        for name, logger in zip(names, self.loggers):
            try:
                logger.start(hparams)
            except Exception as error:  # the logger's own set-up: one line saying what it said
                raise AvrError(f"--logger {name} could not start: "
                               f"{str(error).splitlines()[0]}") from error

    def epoch(self, log) -> None:
        figures = epoch_figures(log)
        for logger in self.loggers:
            logger.epoch(log.epoch, figures)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def log_test_metrics(run_dir: Path, metrics: dict[str, float], step: int) -> None:
    """`avr eval`'s test metrics added to the run's TensorBoard events (when installed)."""
    if not tensorboard_installed():
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(run_dir)) as writer:
        for name in VAL_METRICS:
            writer.add_scalar(f"test/{name}", metrics[name], step)
