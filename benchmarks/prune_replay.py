"""Replay a recorded grid through Optuna's pruners: the pruning table of BENCHMARKS.md.

    python benchmarks/sweep_targets.py prune --cache avr-demo/cache     # records the grid
    python benchmarks/prune_replay.py sweep-bench/prune/runs/sweeps/tefal-grid --seeds 10
    python benchmarks/sweep_targets.py prune-val                        # VATEX's val size
    python benchmarks/prune_replay.py sweep-bench/prune-val/runs/sweeps/val-grid --seeds 5 \
        --trials 12 --names val-tpe --margin 1 --share-of grid

Training a configuration is deterministic (same seed, CPU), so a TPE trial that draws a grid
point reports that point's recorded val R@1 curve. Each TPE study of 24 trials is replayed as
`avr sweep --search tpe --trials 24 --prune` runs it (TPESampler with the constant liar,
seeded by the seed plus the trial's number; a report after every epoch, no pruning after the
last; a trial that draws a finished trial's options takes its result untrained, avr's
`finished_twin`), under each pruner, for
every seed and study name (Hyperband assigns brackets by a hash of both). It prints, per
pruner: the epochs trained as a share of the trials' full epochs, and in how many studies the
best complete trial is more than ``--margin`` points below the grid's best.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import optuna

from avr.fuse import sweep as sweeps

Curves = dict[tuple[str, ...], list[float]]


def recorded_curves(grid_dir: Path) -> tuple[list[str], Curves]:
    """The searched options and, per grid point, val R@1 after each epoch (its log.csv)."""
    with (grid_dir / sweeps.TRIALS_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    names = list(rows[0])[len(sweeps.TRIALS_COLUMNS):]
    curves = {}
    for row in rows:
        with (grid_dir / f"trial-{int(row['trial']):04d}" / "log.csv").open() as handle:
            curves[tuple(row[n] for n in names)] = [float(e["val_r1"])
                                                    for e in csv.DictReader(handle)]
    return names, curves


def replay(names: list[str], curves: Curves, pruner, seed: int, study_name: str,
           trials: int, retrain_repeats: bool) -> tuple[int, float]:
    """One TPE study over the grid's points: (epochs trained, best complete val R@1)."""
    study = optuna.create_study(study_name=study_name, direction="maximize", pruner=pruner)
    values = [sorted({point[i] for point in curves}, key=float) for i in range(len(names))]
    trained = 0
    for number in range(trials):
        # as avr's make_sampler: each trial's draw seeded by the seed plus its number
        study.sampler = optuna.samplers.TPESampler(seed=seed + number, constant_liar=True)
        trial = study.ask()
        point = tuple(trial.suggest_categorical(n, v) for n, v in zip(names, values))
        earlier = None if retrain_repeats else sweeps.finished_twin(study, trial)
        if earlier is not None:
            sweeps.repeat_finished(study, trial, earlier, sweeps.SweepCallbacks())
            continue
        curve = curves[point]
        for epoch, value in enumerate(curve, 1):
            trained += 1
            trial.report(value, epoch)
            if epoch < len(curve) and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, max(curve))
    complete = [t.value for t in study.trials if t.value is not None]
    return trained, max(complete, default=float("nan"))


def pruners(epochs: int) -> dict[str, callable]:
    P = optuna.pruners
    table = {"none": lambda: P.NopPruner()}
    for minimum, factor in ((1, 2), (1, 3), (1, 4), (2, 2), (3, 4)):
        table[f"Hyperband min_resource={minimum} reduction_factor={factor}"] = (
            lambda m=minimum, f=factor: P.HyperbandPruner(m, epochs, f))
    for minimum, factor in ((1, 3), (2, 3), (1, 4)):
        table[f"SuccessiveHalving min_resource={minimum} reduction_factor={factor}"] = (
            lambda m=minimum, f=factor: P.SuccessiveHalvingPruner(m, f))
    for startup, warmup in ((3, epochs // 5), (3, epochs * 3 // 10), (3, epochs // 3),
                            (5, epochs // 3)):
        table[f"Median n_startup_trials={startup} n_warmup_steps={warmup}"] = (
            lambda s=startup, w=warmup: P.MedianPruner(s, w))
    table["Patient(SuccessiveHalving 1/3, patience=3)"] = (
        lambda: P.PatientPruner(P.SuccessiveHalvingPruner(1, 3), 3))
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("grid_dir", type=Path, help="runs/sweeps/<grid sweep>/ of a full grid")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--names", default="tefal-tpe", help="comma-separated study names")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--margin", type=float, default=2.0,
                        help="val R@1 points below the grid's best that count as losing it")
    parser.add_argument("--share", type=float, default=0.4,
                        help="the target: at most this share of the full epochs (--share-of)")
    parser.add_argument("--share-of", choices=("trials", "grid"), default="trials",
                        help="the epochs the share counts against: the TPE trials' full epochs, "
                             "or the full grid's (a study of fewer trials than grid points)")
    parser.add_argument("--retrain-repeats", action="store_true",
                        help="train a drawn configuration again (avr sweep before it reused "
                             "finished trials' results)")
    options = parser.parse_args()
    sweeps.quiet_optuna()
    names, curves = recorded_curves(options.grid_dir)
    epochs = len(next(iter(curves.values())))
    grid_best = max(max(curve) for curve in curves.values())
    studies = [(seed, name) for seed in range(options.seeds)
               for name in options.names.split(",")]
    full = (options.trials if options.share_of == "trials" else len(curves)) * epochs
    print(f"grid of {len(curves)} points x {epochs} epochs, best val R@1 {grid_best:.2f}; "
          f"{len(studies)} studies of {options.trials} TPE trials per pruner")
    whose = "the grid's" if options.share_of == "grid" else "the trials'"
    print(f"| pruner | epochs trained, of {whose} {full} (min-max, mean) "
          f"| best lost > {options.margin:g} points "
          f"| both targets |")
    print("|---|---|---|---|")
    for label, make in pruners(epochs).items():
        results = [replay(names, curves, make(), seed, name, options.trials,
                          options.retrain_repeats)
                   for seed, name in studies]
        shares = [trained / full for trained, _ in results]
        lost = [not grid_best - best <= options.margin for _, best in results]
        met = sum(share <= options.share and not miss for share, miss in zip(shares, lost))
        print(f"| {label} | {min(shares):.0%}-{max(shares):.0%} ({sum(shares) / len(shares):.0%})"
              f" | {sum(lost)} of {len(results)} | {met} of {len(results)} |", flush=True)


if __name__ == "__main__":
    main()
