"""Hyperparameter sweeps: the cache is loaded once, every trial trains on the same tensors.

A grid is written as ``"lr=1e-4,3e-4 temperature=0.05,0.1"``: space-separated keys, each with
comma-separated values; keys are training options or options of the head. The trials are the
Cartesian product, run one after another, and ranked by their best validation R@1.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from avr.device import resolve_device
from avr.fuse.config import head_options, split_options
from avr.fuse.fields import typed_fields
from avr.fuse.trainer import (CacheData, TrainConfig, TrainResult, build_run, fit, load_cache,
                              schedule_for_store, train)


def trial_configs(base: TrainConfig, grid: list[dict[str, Any]]) -> list[TrainConfig]:
    """The checked TrainConfig of every trial: ``base`` with the trial's options applied."""
    configs = []
    for options in grid:
        train_opts, head_opts = split_options(options, base.head)
        config = dataclasses.replace(
            base, head_options={**base.head_options, **head_options(base.head, head_opts, "--grid")},
            **typed_fields(TrainConfig, train_opts, "--grid"))
        config.validate()
        configs.append(config)
    return configs


@dataclass
class Trial:
    options: dict[str, Any]
    result: TrainResult
    seconds: float


def sweep(cache_path: str | Path, base: TrainConfig, grid: list[dict[str, Any]],
          runs_dir: Path | None = None,
          on_trial: Callable[[int, Trial], None] | None = None) -> list[Trial]:
    """Train every configuration of ``grid`` on one in-memory copy of the cache."""
    configs = [schedule_for_store(cache_path, config)[0] for config in trial_configs(base, grid)]
    device = resolve_device(base.device)
    cache: CacheData = load_cache(cache_path, base.head, device,
                                  head_options=[config.head_options for config in configs])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    trials = []
    for index, (options, config) in enumerate(zip(grid, configs)):
        run_dir = None if runs_dir is None else runs_dir / f"sweep-{stamp}-{base.head}" / f"{index:03d}"
        started = time.perf_counter()
        result = (train(cache_path, config, run_dir, cache=cache) if run_dir
                  else _train_in_memory(config, cache))
        trial = Trial(options, result, time.perf_counter() - started)
        trials.append(trial)
        if on_trial is not None:
            on_trial(index, trial)
    return sorted(trials, key=lambda t: -t.result.best_val_r1)


def _train_in_memory(config: TrainConfig, cache: CacheData) -> TrainResult:
    config.validate()
    return fit(build_run(config, cache, resolve_device(config.device)))
