"""Hyperparameter sweeps as Optuna studies: samplers, pruning, storage that many workers share.

A sweep is a study named ``--name`` in an Optuna database (``runs/sweeps/<name>/study.db``,
SQLite, unless ``--storage URL``) holding its plan, so that ``avr sweep --name S`` started
again, or on N GPUs or machines against one database, trains the same sweep: each worker asks
the study for the next trial, trains it on the store it loaded once, and tells the result.

- ``plan``: the sweep's definition, its checks, each trial's options and config;
- ``storage``: the study's database, its lock, creating and joining the study;
- ``worker``: the loop that asks, trains, reports and tells; heartbeats; dead workers' trials;
- ``results``: the ranked rows, ``trials.csv``, the plots, dropping other trials' weights;
- ``runs``: where trials live (``--runs-dir``: a folder, or a URL every machine reaches);
- ``run``: ``run_sweep``, all of ``avr sweep`` in one call.

Optuna is imported where it is used: this package imports without the ``[sweep]`` extra.
"""

from avr.fuse.sweep.plan import (HEARTBEAT_S, SEARCHES, SweepPlan, check_plan, check_store,
                                 checked_axes, plan_differences, resolve_plan, suggest,
                                 trial_config)
from avr.fuse.sweep.results import (CURVES_PLOT, IMPORTANCES_PLOT, TRIALS_COLUMNS, TRIALS_FILE,
                                    TrialRow, drop_weights_of_others, finished_rows, trial_row,
                                    write_plots, write_trials_csv)
from avr.fuse.sweep.run import SweepResult, SweepStart, run_sweep
from avr.fuse.sweep.runs import SWEEPS_DIR, SweepRuns
from avr.fuse.sweep.storage import (PLAN_ATTR, PRUNER_SETTINGS, STUDY_FILE, STUDY_TIMEOUT_S,
                                    StudyLock, database_url, make_sampler, open_storage, open_study,
                                    optuna_module, quiet_optuna, storage_url, stored_plan,
                                    sweep_dir)
from avr.fuse.sweep.worker import (SweepCallbacks, finished_twin, release_dead_trials,
                                   repeat_finished, run_worker, take_trials, work_left,
                                   worker_identity)

__all__ = [
    "CURVES_PLOT", "HEARTBEAT_S", "IMPORTANCES_PLOT", "PLAN_ATTR", "PRUNER_SETTINGS", "SEARCHES",
    "STUDY_FILE", "STUDY_TIMEOUT_S", "SWEEPS_DIR", "TRIALS_COLUMNS", "TRIALS_FILE", "StudyLock",
    "SweepCallbacks", "SweepPlan", "SweepResult", "SweepRuns", "SweepStart", "TrialRow",
    "check_plan", "check_store", "checked_axes", "database_url", "drop_weights_of_others",
    "finished_rows", "finished_twin", "make_sampler", "open_storage", "open_study",
    "optuna_module", "plan_differences", "quiet_optuna", "release_dead_trials", "repeat_finished",
    "resolve_plan", "run_sweep", "run_worker", "storage_url", "stored_plan", "suggest",
    "sweep_dir", "take_trials", "trial_config", "trial_row", "work_left", "worker_identity",
    "write_plots", "write_trials_csv",
]
