"""Hyperparameter sweeps: the cache is loaded once, every trial trains on the same tensors.

A grid is written as ``"lr=1e-4,3e-4 temperature=0.05,0.1"``: space-separated keys, each with
comma-separated values; keys are training options or options of the head. The trials are the
Cartesian product, run one after another, and ranked by their best validation R@1.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from avr.device import resolve_device
from avr.errors import AvrError
from avr.fuse.trainer import CacheData, TrainConfig, TrainResult, load_cache, split_options, train


def parse_value(text: str) -> Any:
    """``3e-4`` -> float, ``12`` -> int, ``true`` -> bool, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "fusion=concat"]`` -> ``{"lr": 1e-4, "fusion": "concat"}``."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AvrError(f"option {item!r} is not of the form key=value")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def parse_grid(grid: str) -> list[dict[str, Any]]:
    """Every combination of the grid, in order."""
    axes = []
    for term in grid.split():
        key, sep, values = term.partition("=")
        if not sep or not values:
            raise AvrError(f"grid term {term!r} is not of the form key=v1,v2,...")
        axes.append([(key.replace("-", "_"), parse_value(v)) for v in values.split(",") if v])
    if not axes:
        raise AvrError("empty grid: give terms like \"lr=1e-4,3e-4 temperature=0.05,0.1\"")
    return [dict(combo) for combo in itertools.product(*axes)]


@dataclass
class Trial:
    options: dict[str, Any]
    result: TrainResult
    seconds: float


def sweep(cache_path: str | Path, base: TrainConfig, grid: list[dict[str, Any]],
          runs_dir: Path | None = None,
          on_trial: Callable[[int, Trial], None] | None = None) -> list[Trial]:
    """Train every configuration of ``grid`` on one in-memory copy of the cache."""
    device = resolve_device(base.device)
    cache: CacheData = load_cache(cache_path, base.head, device)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    trials = []
    for index, options in enumerate(grid):
        train_opts, head_opts = split_options(options, base.head)
        config = dataclasses.replace(base, head_options={**base.head_options, **head_opts},
                                     **train_opts)
        run_dir = None if runs_dir is None else runs_dir / f"sweep-{stamp}-{base.head}" / f"{index:03d}"
        started = time.perf_counter()
        result = train(cache_path, config, run_dir, cache=cache) if run_dir else _train_in_memory(
            cache_path, config, cache)
        trial = Trial(options, result, time.perf_counter() - started)
        trials.append(trial)
        if on_trial is not None:
            on_trial(index, trial)
    return sorted(trials, key=lambda t: -t.result.best_val_r1)


def _train_in_memory(cache_path, config: TrainConfig, cache: CacheData) -> TrainResult:
    from avr.fuse.heads import build_head
    from avr.fuse.trainer import fit, seed_everything

    config.validate()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    head = build_head(config.head, cache.spec, config.head_options).to(device)
    return fit(head, cache, config, device)
