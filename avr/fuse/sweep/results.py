"""A sweep's results as people read them: one row per finished trial, ranked; ``trials.csv``;
the val R@1 curves and the parameter importances as plots; the weights of other trials dropped.

- ``trials.csv`` (a contract for scripts): trial, state, epochs, best_val_r1, seconds, then one
  column per searched option, in trial order; replaced whole, so a reader never sees half.
- Rows are ranked best val R@1 first, failed trials last; a failed row says why it failed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avr.fuse import checkpoint
from avr.store import transfer
from avr.fuse.sweep.plan import METRIC, SweepPlan
from avr.fuse.sweep.storage import PLAN_ATTR, optuna_module

TRIALS_FILE = "trials.csv"
CURVES_PLOT = "val_r1.png"
IMPORTANCES_PLOT = "importances.png"
TRIALS_COLUMNS = ("trial", "state", "epochs", "best_val_r1", "seconds")
STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
IMPORTANCE_TRIALS = 8  # complete trials of distinct options before importances are drawn


@dataclass
class TrialRow:
    """One finished trial as trials.csv and the ranked table show it."""

    number: int
    state: str  # complete | pruned | failed
    epochs: int
    best_val_r1: float
    seconds: float
    options: dict[str, Any]
    best_epoch: int | None
    run_dir: str | None
    curve: list[float]  # val R@1 after each epoch
    repeats: int | None  # the finished trial whose options it drew, taking its result
    error: str | None = None  # why a failed trial failed


# A failed trial without a recorded reason: its worker stopped without telling the study.
LOST_WORKER = "its worker stopped while training it (killed, or its machine lost)"


def trial_row(trial) -> TrialRow:
    curve = [trial.intermediate_values[step] for step in sorted(trial.intermediate_values)]
    seconds = trial.user_attrs.get("seconds")
    if seconds is None and trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    best = max(curve) if curve else (trial.value if trial.value is not None else math.nan)
    return TrialRow(trial.number, STATE_NAMES[trial.state.name],
                    trial.user_attrs.get("epochs", len(curve)), best,
                    seconds if seconds is not None else math.nan, dict(trial.params),
                    trial.user_attrs.get("best_epoch"), trial.user_attrs.get("run_dir"), curve,
                    trial.user_attrs.get("repeats"),
                    trial.user_attrs.get("error", LOST_WORKER) if trial.state.name == "FAIL"
                    else None)


def finished_rows(study) -> list[TrialRow]:
    """Every finished trial (complete, pruned, failed), best val R@1 first, failed ones last."""
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    return sorted(rows, key=lambda r: (r.state == "failed",
                                       -(r.best_val_r1 if not math.isnan(r.best_val_r1)
                                         else -math.inf), r.number))


def write_trials_csv(study, out_dir: Path) -> Path:
    """``trials.csv``: trial, state, epochs, best_val_r1, seconds, then one column per searched
    option (empty where a trial's head has no such option), in trial order."""
    axes = SweepPlan.from_json(study.user_attrs[PLAN_ATTR]).axes
    rows = sorted(finished_rows(study), key=lambda r: r.number)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TRIALS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*TRIALS_COLUMNS, *(axis.name for axis in axes)])
        for row in rows:
            writer.writerow([row.number, row.state, row.epochs, f"{row.best_val_r1:.4f}",
                             f"{row.seconds:.3f}", *(row.options.get(a.name, "") for a in axes)])
    tmp.replace(path)  # several workers may write it; a reader never sees half a file
    return path


def write_plots(study, out_dir: Path) -> list[Path]:
    """``val_r1.png`` (``curves_figure``) and ``importances.png`` (Optuna's parameter
    importances, PED-ANOVA: it needs no scikit-learn), the latter once ``IMPORTANCE_TRIALS``
    trials have completed with different options: fewer say nothing about importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = optuna_module()
    rows = sorted(finished_rows(study), key=lambda r: r.number)
    figure = curves_figure(study.study_name, rows)
    paths = [out_dir / CURVES_PLOT]
    figure.savefig(paths[0], dpi=120, bbox_inches="tight")
    plt.close(figure)
    complete = [r for r in rows if r.state == "complete"]
    if len({json.dumps(r.options, sort_keys=True) for r in complete}) >= IMPORTANCE_TRIALS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            plot = optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                target_name=METRIC)
        paths.append(out_dir / IMPORTANCES_PLOT)
        plot.figure.savefig(paths[1], dpi=120, bbox_inches="tight")
        plt.close(plot.figure)
    return paths


def curves_figure(name: str, rows: list[TrialRow]):
    """val R@1 after each epoch of every trial trained (a trial that took another's result is
    that trial's line): solid complete, dashed and ending in a cross pruned, dotted failed; a
    legend names each line's trial and options."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5))
    style = {"pruned": dict(ls="--", alpha=0.6), "failed": dict(ls=":", alpha=0.4)}
    trained = [row for row in rows if row.repeats is None]
    for row in trained:
        line, = axes.plot(range(1, len(row.curve) + 1), row.curve, lw=1.2,
                          label=f"{row.number}: {options_text(row.options)}",
                          **style.get(row.state, {}))
        if row.state == "pruned" and row.curve:
            axes.plot(len(row.curve), row.curve[-1], "x", color=line.get_color(), ms=8)
    pruned = " (x: pruned)" if any(row.state == "pruned" for row in trained) else ""
    axes.set(xlabel="epoch", ylabel=f"{METRIC} (%)",
             title=f"{name}: {len(rows)} trials{pruned}")
    axes.grid(alpha=0.3)
    if trained:
        axes.legend(title="trial", fontsize="x-small", title_fontsize="small", loc="upper left",
                    bbox_to_anchor=(1.01, 1.0), ncol=1 + len(trained) // 25)
    return figure


def options_text(options: dict[str, Any]) -> str:
    """A trial's options as the table and the legend show them."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in options.items())


def drop_weights_of_others(study) -> None:
    """Delete the weights of every finished trial but the best (logs and configs stay), leaving
    in each trial's folder a note that says so and how to keep them (``avr eval`` shows it).
    A trial's folder is where the study says, here or at the sweep's URL."""
    rows = [r for r in finished_rows(study) if r.run_dir]
    best = next((r for r in rows if r.state == "complete"), None)
    kept = f"only its best trial's ({best.run_dir})" if best else "none"
    note = (f"sweep {study.study_name!r} kept the weights of {kept}; to keep every trial's, run "
            f"the sweep with --save-runs (under a new --name: a finished trial is not trained "
            f"again), or train this trial's config.json with avr train\n")
    for row in rows:
        weights = transfer.files(row.run_dir, "*.safetensors") if row is not best else []
        if weights:
            transfer.write_text(transfer.join(row.run_dir, checkpoint.WEIGHTS_DROPPED_FILE), note)
            transfer.remove(row.run_dir, weights)
