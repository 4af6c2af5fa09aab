"""The Python API: what the commands do, for a notebook or a script. Paths may be ``str`` or
``Path``; each function returns the typed result the command prints.

    import avr
    run = avr.train("cache/", head="xpool", epochs=5, lr=1e-4)      # TrainResult
    result = avr.evaluate(run.run_dir)                               # EvalResult (metrics.json)
    hits = avr.search("a dog barks while a ball rolls", run.run_dir) # list of Hit
    study = avr.sweep(grid="lr=1e-5:1e-3:log", cache="cache/", head="xpool", trials=8)

Options are the commands' own, by the names config.json and ``--opt`` use; a value is checked
as the command checks it (one ``AvrError`` naming the option).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train(cache: str | Path | None = None, head: str = "tefal",
          run_dir: str | Path | None = None,
          *, resume: str | Path | None = None, config_file: str | Path | None = None,
          on_epoch=None, **options: Any):
    """Train a head on a store (default ``cache/``; a resumed run's own) as `avr train` does
    (``resume``: continue that run; ``options``:
    training options such as ``epochs``, ``lr``, ``pairs`` and the head's own such as
    ``fusion`` or ``dropout``; unset ones come from the schedule). Returns the
    ``avr.fuse.trainer.TrainResult``."""
    from avr.fuse.config import TRAIN_FIELDS, TrainRequest
    from avr.fuse.trainer import train_from_options

    training = {k: v for k, v in options.items() if k in TRAIN_FIELDS}
    request = TrainRequest(
        cache=None if cache is None else str(cache), config_file=_path(config_file),
        run_dir=_path(run_dir),
        resume=_path(resume), train={**training, "head": head if resume is None else None},
        head={k: v for k, v in options.items() if k not in TRAIN_FIELDS})
    return train_from_options(request, on_epoch=on_epoch)


def evaluate(run: str | Path | None = None, cache: str | Path | None = None, *,
             write: bool = True, **options: Any):
    """Evaluate a run (default: the latest under runs/) as `avr eval` does, on ``options`` of
    ``avr.evaluate.evaluator.EvalConfig`` (``split``, ``dsl``, ``qbnorm``, ``modalities``,
    ``device`` ...); ``write``: record metrics.json in the run. Returns the ``EvalResult``."""
    from avr.evaluate.evaluator import EvalConfig, evaluate_run, write_metrics

    result = evaluate_run(run, cache, EvalConfig(**options))
    if write:
        write_metrics(result)
    return result


def search(query: str | list[str], run: str | Path | None = None, *, k: int = 10,
           split: str = "test", device: str = "auto"):
    """The ``k`` videos a run's head ranks first for ``query`` (a list of queries: a list of
    results, the run loaded once), as `avr search` does."""
    from avr.evaluate.search import Searcher

    searcher = Searcher(run, split=split, device=device)
    if isinstance(query, str):
        return searcher.search(query, k)
    return searcher.search_many(list(query), k)


def sweep(name: str | None = None, *, cache: str | Path | None = None, **options: Any):
    """Run (or join) an `avr sweep` study: ``grid``, ``search``, ``trials``, ``prune``,
    ``head``, ``epochs``, ``parallel`` ... as the command's flags. Returns the ``SweepResult``:
    every finished trial, ranked."""
    from avr.fuse.sweep import run_sweep

    return run_sweep(name, cache=None if cache is None else str(cache), **options)


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)
