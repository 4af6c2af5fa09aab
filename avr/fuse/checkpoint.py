"""Run directories: what a trained head leaves behind and how it is loaded again.

A run directory holds
    config.json        head name and options, training options, the identity of its cache
    best.safetensors   head weights at the best validation R@1 (never chosen on test)
    last.safetensors   head weights, optimizer and schedule state at the end of the last epoch
    log.csv            one row per epoch (``EpochLog``; a column per loss part of the head)
    events.*           TensorBoard events

``TrainState`` is what a run carries from epoch to epoch (head, optimizer, schedule, progress,
history); ``save_last`` and ``load_last`` write and read it, so that a resumed run continues
exactly where the last epoch ended. Weights load from safetensors only (no pickle).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from avr.errors import CacheMismatchError, RunError
from avr.fuse.heads import build_head
from avr.fuse.heads.base import RetrievalHead
from avr.store import schema
from avr.store.schema import CacheSpec

CONFIG_FILE = "config.json"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
LOG_FILE = "log.csv"
WEIGHTS_DROPPED_FILE = "weights-dropped.txt"  # why a sweep deleted a trial's weights
DEFAULT_RUNS_DIR = Path("runs")


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise RunError(f"{run_dir}: not a run directory ({CONFIG_FILE} not found)")
    return json.loads(path.read_text())


def latest_run(runs_dir: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """The most recently modified run directory under ``runs_dir``."""
    runs_dir = Path(runs_dir)
    runs = [p for p in runs_dir.glob("*") if (p / CONFIG_FILE).exists()] if runs_dir.exists() else []
    if not runs:
        raise RunError(f"no runs under {runs_dir}/; train one with `avr train --cache cache/` "
                       f"or name one with --run DIR")
    return max(runs, key=lambda p: (p / CONFIG_FILE).stat().st_mtime)


def run_spec(config: dict[str, Any]) -> CacheSpec:
    return CacheSpec.from_attrs(config["cache"]["identity"]["spec"])


def check_cache(config: dict[str, Any], spec: CacheSpec, cache_path: str | Path) -> None:
    """Refuse a cache whose schema or backbones differ from the run's, naming the difference."""
    identity = config["cache"]["identity"]
    if identity["schema_version"] != schema.SCHEMA_VERSION:
        raise CacheMismatchError(f"run was trained on schema version {identity['schema_version']},"
                                 f" {cache_path} is version {schema.SCHEMA_VERSION}")
    diffs = schema.spec_differences(spec, run_spec(config), ignore_versions=True)
    if diffs:
        raise CacheMismatchError(f"{cache_path} is not the cache this run was trained on:\n  "
                                 + "\n  ".join(diffs))


def save_weights(head: RetrievalHead, path: Path, extra: dict[str, torch.Tensor] | None = None,
                 metadata: dict[str, str] | None = None) -> None:
    tensors = {f"head.{k}": v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra or {}).items()})
    meta = {"head": head.name}
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)


def load_weights(head: RetrievalHead, path: Path) -> dict[str, torch.Tensor]:
    """Load head weights from ``path``; returns the non-head tensors saved beside them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        saved_head = (f.metadata() or {}).get("head")
    if saved_head is not None and saved_head != head.name:
        raise RunError(f"{path} holds weights of head {saved_head!r}, not {head.name!r}")
    tensors = load_file(str(path))
    state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RunError(f"{path} does not fit head {head.name!r}: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    return {k: v for k, v in tensors.items() if not k.startswith("head.")}


def load_head(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu"
              ) -> tuple[RetrievalHead, dict[str, Any]]:
    """Rebuild a run's head from its config.json and load its ``best`` or ``last`` weights."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    head = build_head(config["head"], run_spec(config), config.get("head_options", {}))
    path = run_dir / (BEST_FILE if which == "best" else LAST_FILE)
    if not path.exists():
        dropped = run_dir / WEIGHTS_DROPPED_FILE
        reason = dropped.read_text().strip() if dropped.exists() else None
        raise RunError(f"{path} not found: {reason or f'the run has no {which} checkpoint yet'}")
    load_weights(head, path)
    return head.to(device).eval(), config


# ---- a run in progress: TrainState, last.safetensors and log.csv ------------------------------

@dataclass
class EpochLog:
    """One row of log.csv."""

    epoch: int
    loss: float
    val_r1: float
    lr: float
    seconds: float
    pairs_per_s: float
    temperature: float
    parts: dict[str, float] = field(default_factory=dict)  # the head's loss parts, epoch means

    def row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "parts"}
        return {**row, **self.parts}


LOG_COLUMNS = tuple(f.name for f in dataclasses.fields(EpochLog) if f.name != "parts")


@dataclass
class TrainState:
    """Everything a run carries from one epoch to the next."""

    head: RetrievalHead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs done
    best_epoch: int = -1
    best_r1: float = -1.0
    history: list[EpochLog] = field(default_factory=list)

    def save_last(self, run_dir: Path) -> None:
        """last.safetensors: weights, optimizer moments, schedule, progress and the torch RNG."""
        state = self.optimizer.state_dict()
        tensors = {f"optim.{index}.{key}": torch.as_tensor(value)
                   for index, values in state["state"].items() for key, value in values.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"epoch": str(self.epoch), "best_epoch": str(self.best_epoch),
                "best_val_R1": str(self.best_r1),
                "param_groups": json.dumps(state["param_groups"]),
                "scheduler": json.dumps(self.scheduler.state_dict())}
        tmp = run_dir / (LAST_FILE + ".tmp")
        save_weights(self.head, tmp, extra=tensors, metadata=meta)
        tmp.replace(run_dir / LAST_FILE)  # a kill never leaves a half-written last

    def load_last(self, run_dir: Path) -> None:
        """Continue from ``run_dir``'s last.safetensors and log.csv."""
        from safetensors import safe_open

        path = run_dir / LAST_FILE
        if not path.exists():
            raise RunError(f"{path} not found: nothing to resume")
        extra = load_weights(self.head, path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in extra.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": json.loads(meta["param_groups"])})
        self.scheduler.load_state_dict(json.loads(meta["scheduler"]))
        torch.set_rng_state(extra["rng.torch"])
        self.epoch, self.best_epoch = int(meta["epoch"]), int(meta["best_epoch"])
        self.best_r1 = float(meta["best_val_R1"])
        self.history = read_log(run_dir)


def append_log(run_dir: Path, log: EpochLog) -> None:
    """One row of log.csv; the columns are fixed by the file's first row."""
    path = run_dir / LOG_FILE
    row = log.row()
    if path.exists():
        with path.open(newline="") as handle:
            columns = next(csv.reader(handle), list(row))
    else:
        columns = list(row)
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if not path.stat().st_size:
            writer.writeheader()
        writer.writerow(row)


def read_log(run_dir: Path) -> list[EpochLog]:
    path = run_dir / LOG_FILE
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [EpochLog(int(r["epoch"]), float(r["loss"]), float(r["val_r1"]), float(r["lr"]),
                         float(r["seconds"]), float(r["pairs_per_s"]), float(r["temperature"]),
                         {k: float(v) for k, v in r.items() if k not in LOG_COLUMNS and v})
                for r in csv.DictReader(handle)]
