"""Run directories: what a trained head leaves behind and how it is loaded again.

A run directory holds
    config.json        head name and options, training options, the identity of its cache
    best.safetensors   head weights at the best validation R@1 (never chosen on test)
    last.safetensors   head weights, optimizer and schedule state at the end of the last epoch
    log.csv            one row per epoch (``EpochLog``; a column per loss part of the head)
    events.*           TensorBoard events

``TrainState`` is what a run carries from epoch to epoch (head, optimizer, schedule and its
``RunProgress``: epochs done, best epoch, history); ``save_last`` and ``load_last`` write and read it, so that a resumed run continues
exactly where the last epoch ended. Weights load from safetensors only (no pickle).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from avr.errors import CacheMismatchError, RunError
from avr.fuse.heads import build_head
from avr.fuse.heads.base import RetrievalHead
from avr.store import schema
from avr.store.identity import identity_differences
from avr.store.lock import StoreLock
from avr.store.schema import CacheSpec

CONFIG_FILE = "config.json"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
LOG_FILE = "log.csv"
WEIGHTS_DROPPED_FILE = "weights-dropped.txt"  # why a sweep deleted a trial's weights
DEFAULT_RUNS_DIR = Path("runs")
TMP_SUFFIX = ".tmp"  # a file being written, renamed into place when whole


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / CONFIG_FILE,
                     json.dumps(config, indent=2, sort_keys=True).encode())


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` at ``path`` through a temporary file renamed into place: a kill or a full disk
    leaves the previous file (or none), never half of one. A write that fails is one RunError
    naming the file and the cause."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise RunError(f"{path}: cannot be written ({error.strerror or error}); the run folder "
                       f"keeps its last complete files") from None


# The keys config.json must hold, with the type of each, for a run to be used again.
CONFIG_KEYS = {"head": str, "head_options": dict, "train": dict, "cache": dict}


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """A run's config.json, checked: valid JSON, an object with the keys a run needs."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise RunError(f"{run_dir}: not a run directory ({CONFIG_FILE} not found)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise RunError(f"{path}: not valid JSON ({error}); the run cannot be read") from None
    if not isinstance(config, dict):
        raise RunError(f"{path}: holds a JSON {type(config).__name__}, not the object a run "
                       f"writes")
    for key, kind in CONFIG_KEYS.items():
        if not isinstance(config.get(key), kind):
            shown = "missing" if key not in config else f"a {type(config[key]).__name__}"
            wanted = "text" if kind is str else "an object"
            raise RunError(f"{path}: {key!r} is {shown}, not {wanted}; the file was edited or "
                           f"cut short")
    try:
        run_spec(config)
    except (KeyError, TypeError, ValueError) as error:
        raise RunError(f"{path}: the store identity under 'cache' is incomplete ({error!r})"
                       ) from None
    return config


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


def check_cache(config: dict[str, Any], identity: dict[str, Any], cache_path: str | Path
                ) -> None:
    """Refuse a store that is not the one the run trained on (its schema, backbones,
    preprocessing or content: ``avr.store.identity``), naming each difference."""
    recorded = config["cache"]["identity"]
    if recorded["schema_version"] != schema.SCHEMA_VERSION:
        raise CacheMismatchError(f"run was trained on schema version {recorded['schema_version']},"
                                 f" {cache_path} is version {schema.SCHEMA_VERSION}")
    diffs = identity_differences(recorded, identity)
    if diffs:
        raise CacheMismatchError(f"{cache_path} is not the cache this run was trained on: "
                                 + "; ".join(diffs))


# ---- the run folder: one writer, no half-written file, no empty run in the way ----------------

def run_lock(run_dir: Path) -> StoreLock:
    """The run folder's lock (``avr.lock`` in it): one writer at a time (a train, a resume, a
    sweep trial, an eval writing its results); a dead holder's lock is taken over."""
    return StoreLock(run_dir, what="run folder")


def remove_temporaries(run_dir: Path) -> None:
    """Drop what a killed writer left half-written: a run folder's files are written through
    temporaries renamed into place (``write_atomically``), so a temporary is never data."""
    for path in run_dir.glob(f"*{TMP_SUFFIX}"):
        if not path.name.startswith(schema.LOCK_FILE):
            path.unlink(missing_ok=True)


def finished_epochs(run_dir: Path) -> int:
    """Epochs a run folder records as finished (rows of log.csv)."""
    return len(read_log(run_dir))


def clear_run(run_dir: Path) -> None:
    """Empty a run folder that finished no epoch (all but its lock), for a new run there."""
    for path in run_dir.iterdir():
        if path.name.startswith(schema.LOCK_FILE):
            continue
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()


def save_weights(head: RetrievalHead, path: Path, extra: dict[str, torch.Tensor] | None = None,
                 metadata: dict[str, str] | None = None) -> None:
    """The head's weights (and ``extra`` tensors) as safetensors at ``path``, written whole or
    not at all."""
    from safetensors.torch import save

    tensors = {f"head.{k}": v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra or {}).items()})
    meta = {"head": head.name}
    meta.update(metadata or {})
    write_atomically(path, save(tensors, metadata=meta))


def load_weights(head: RetrievalHead, path: Path) -> dict[str, torch.Tensor]:
    """Load head weights from ``path``; returns the non-head tensors saved beside them. A file
    that is not safetensors, or weights of another head, shape or dtype, is refused naming the
    file and the tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            saved_head = (f.metadata() or {}).get("head")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise RunError(f"{path}: not a readable safetensors file ({error}); it was cut short "
                       f"or overwritten") from None
    if saved_head is not None and saved_head != head.name:
        raise RunError(f"{path} holds weights of head {saved_head!r}, not {head.name!r}")
    state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    own = head.state_dict()
    for name, value in state.items():
        if name in own and (value.shape != own[name].shape or value.dtype != own[name].dtype):
            raise RunError(f"{path}: tensor head.{name} is {value.dtype} "
                           f"{list(value.shape)}, the head's is {own[name].dtype} "
                           f"{list(own[name].shape)}")
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
    val_r5: float = math.nan  # the rest of the validation metrics (runs before them: nan)
    val_r10: float = math.nan
    val_mdr: float = math.nan

    def row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "parts"}
        return {**row, **self.parts}


LOG_COLUMNS = tuple(f.name for f in dataclasses.fields(EpochLog) if f.name != "parts")
LATER_COLUMNS = ("val_r5", "val_r10", "val_mdr")  # a log written before them lacks them


@dataclass
class RunProgress:
    """How far a run (or one stacked trial) has got: epochs done, its best epoch by val R@1, and
    the log of every epoch."""

    epoch: int = 0  # epochs done
    best_epoch: int = -1
    best_r1: float = -1.0
    history: list[EpochLog] = field(default_factory=list)


@dataclass
class TrainState:
    """Everything a run carries from one epoch to the next."""

    head: RetrievalHead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: RunProgress = field(default_factory=RunProgress)

    def save_last(self, run_dir: Path) -> None:
        """last.safetensors: weights, optimizer moments, schedule, progress and the torch RNG."""
        state = self.optimizer.state_dict()
        tensors = {f"optim.{index}.{key}": torch.as_tensor(value)
                   for index, values in state["state"].items() for key, value in values.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        progress = self.progress
        meta = {"epoch": str(progress.epoch), "best_epoch": str(progress.best_epoch),
                "best_val_R1": str(progress.best_r1),
                "param_groups": json.dumps(state["param_groups"]),
                "scheduler": json.dumps(self.scheduler.state_dict())}
        save_weights(self.head, run_dir / LAST_FILE, extra=tensors, metadata=meta)

    def load_last(self, run_dir: Path) -> None:
        """Continue from ``run_dir``'s last.safetensors and log.csv."""
        from safetensors import safe_open

        path = run_dir / LAST_FILE
        if not path.exists():
            raise RunError(f"{path} not found: the run finished no epoch, so there is nothing "
                           f"to resume; start it again with the same `avr train` command (a "
                           f"run folder whose run finished no epoch is replaced)")
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
        self.progress = RunProgress(int(meta["epoch"]), int(meta["best_epoch"]),
                                    float(meta["best_val_R1"]), read_log(run_dir))


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
    """log.csv's rows; a row that is not one avr wrote is refused naming its line."""
    path = run_dir / LOG_FILE
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        rows = []
        for line, r in enumerate(csv.DictReader(handle), 2):
            try:
                rows.append(EpochLog(int(r["epoch"]), float(r["loss"]), float(r["val_r1"]),
                                     float(r["lr"]), float(r["seconds"]),
                                     float(r["pairs_per_s"]), float(r["temperature"]),
                                     {k: float(v) for k, v in r.items()
                                      if k not in LOG_COLUMNS and k is not None and v},
                                     *(float(r.get(k) or math.nan) for k in LATER_COLUMNS)))
            except (KeyError, TypeError, ValueError) as error:
                raise RunError(f"{path}, line {line}: not a row avr writes ({error}); the file "
                               f"was edited") from None
        return rows
