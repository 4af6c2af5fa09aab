"""The sweep figures of BENCHMARKS.md, on the demo cache (`avr demo` makes it), through `avr`.

    python benchmarks/sweep_targets.py parallel --cache avr-demo/cache   # xpool, 16 configs
    python benchmarks/sweep_targets.py prune --cache avr-demo/cache      # tefal, TPE + prune
    python benchmarks/sweep_targets.py resume --cache avr-demo/cache     # SIGKILL, then resume
    python benchmarks/sweep_targets.py prune-val                         # VATEX's val size
    python benchmarks/sweep_targets.py workers --storage postgresql://USER@HOST/DB  # 1, 2, 4

benchmarks/prune_replay.py replays the prune figures' grids through other pruners and seeds.

prune-val writes its own store (`avr bench store --shapes tiny`, VATEX's validation split of
1,500 videos x 10 captions, 1,000 train videos) unless --cache names one, trains the full grid
of a 3-parameter TEFAL space (24 points), then one TPE + --prune study of 12 trials (seed 0).
TEFAL runs with ``fusion=late`` (its paper's Table 8 (A): the audio branch reads AST's global
tokens): the default ``add`` attends over every audio patch token of 1,500 videos for each of
15,000 captions at every validation, minutes of CPU each, and the question here is the noise of
val R@1 on a split of this size, not the fusion.

Each writes its sweeps under --out (default sweep-bench/) and prints the figures.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

DEMO = ["--batch-size", "16", "--device", "cpu", "--opt", "pairs=all", "--opt", "warmup=0",
        "--opt", "weight_decay=0.01"]  # the demo's training, every caption


def avr(out: Path, *args: str) -> float:
    """Run `avr` in ``out``; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "avr", *args], cwd=out, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def trials(out: Path, name: str) -> list[dict[str, str]]:
    with (out / "runs" / "sweeps" / name / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def parallel(cache: str, out: Path, epochs: int) -> None:
    grid = "lr=1e-3,2e-3,3e-3,5e-3 temperature=0.02,0.05,0.1,0.2"
    common = ["sweep", "--cache", cache, "--head", "xpool", "--epochs", str(epochs), *DEMO,
              "--opt", "dropout=0", "--save-runs", "--grid", grid]
    one = avr(out, *common, "--name", "xpool-p1", "--parallel", "1")
    sixteen = avr(out, *common, "--name", "xpool-p16", "--parallel", "16")
    by_point = {}
    for name in ("xpool-p1", "xpool-p16"):
        for row in trials(out, name):
            by_point.setdefault((row["lr"], row["temperature"]), []).append(
                out / "runs" / "sweeps" / name / f"trial-{int(row['trial']):04d}")
    differences = {}
    for point, (alone, together) in by_point.items():
        a = load_file(str(alone / "best.safetensors"))
        b = load_file(str(together / "best.safetensors"))
        differences[point] = max(float((a[k] - b[k]).abs().max()) for k in a)
    within = sum(d <= 1e-4 for d in differences.values())
    print(f"xpool 16 configs x {epochs} epochs: --parallel 1 {one:.1f} s, --parallel 16 "
          f"{sixteen:.1f} s, ratio {sixteen / one:.1%}; largest weight difference "
          f"{max(differences.values()):.2e}, {within} of {len(differences)} trials within 1e-4")
    for (lr, temperature), difference in sorted(differences.items()):
        print(f"  lr {lr} temperature {temperature}: {difference:.2e}")


def prune(cache: str, out: Path, epochs: int) -> None:
    space = "lr=3e-4,1e-3,3e-3,1e-2 temperature=0.02,0.05,0.1 dropout=0.0,0.3"
    common = ["sweep", "--cache", cache, "--head", "tefal", "--epochs", str(epochs), *DEMO,
              "--seed", "0", "--grid", space]
    full = avr(out, *common, "--name", "tefal-grid")
    tpe = avr(out, *common, "--name", "tefal-tpe", "--search", "tpe", "--trials", "24", "--prune")
    grid_rows, tpe_rows = trials(out, "tefal-grid"), trials(out, "tefal-tpe")
    best_grid = max(float(r["best_val_r1"]) for r in grid_rows)
    # The sweep's result is its best complete trial: a pruned one's weights are not kept.
    best_tpe = max(float(r["best_val_r1"]) for r in tpe_rows if r["state"] == "complete")
    pruned = sum(r["state"] == "pruned" for r in tpe_rows)
    repeats = sum(r["epochs"] == "0" for r in tpe_rows)  # took a finished trial's result
    trained = sum(int(r["epochs"]) for r in tpe_rows)
    print(f"tefal 24-point grid x {epochs} epochs: {full:.1f} s, best val R@1 {best_grid:.2f}; "
          f"TPE 24 trials + prune: {tpe:.1f} s, {pruned} pruned, {repeats} repeats, {trained} of "
          f"{24 * epochs} epochs ({trained / (24 * epochs):.1%}), best val R@1 {best_tpe:.2f} "
          f"({best_tpe - best_grid:+.2f})")


VAL_STORE = ["--shapes", "tiny", "--videos", "2600", "--val-videos", "1500", "--test-videos",
             "100", "--heads", "tefal"]  # 1,000 train videos; VATEX's val split
VAL_SPACE = "lr=1e-4,3e-4,1e-3,3e-3 temperature=0.01,0.03,0.1 dropout=0.0,0.3"  # 24 points
VAL_TRIALS = 12
# Every caption each epoch at batch 128 (1,000 train videos: 79 steps), not the MSR-VTT recipe's
# batch 32 that a generated store falls back to: 6 epochs of a trial take a minute, not ten.
VAL_TRAINING = ["--device", "cpu", "--opt", "fusion=late", "--opt", "pairs=all", "--batch-size",
                "128", "--seed", "0"]


def prune_val(cache: str | None, out: Path, epochs: int) -> None:
    if cache is None:
        cache = str((out / "cache").resolve())
        avr(out, "bench", "store", *VAL_STORE, "--out", cache)
    common = ["sweep", "--cache", cache, "--head", "tefal", "--epochs", str(epochs),
              *VAL_TRAINING, "--grid", VAL_SPACE]
    full = avr(out, *common, "--name", "val-grid")
    tpe = avr(out, *common, "--name", "val-tpe", "--search", "tpe", "--trials", str(VAL_TRIALS),
              "--prune")
    grid_rows, tpe_rows = trials(out, "val-grid"), trials(out, "val-tpe")
    points = len(grid_rows)
    best_grid = max(float(r["best_val_r1"]) for r in grid_rows)
    best_tpe = max(float(r["best_val_r1"]) for r in tpe_rows if r["state"] == "complete")
    trained = sum(int(r["epochs"]) for r in tpe_rows)
    print(f"tefal (fusion late) {points}-point grid x {epochs} epochs on 1,500 val videos x 10 "
          f"captions: {full:.0f} s, best val R@1 {best_grid:.2f}; TPE {VAL_TRIALS} trials + "
          f"prune: {tpe:.0f} s, {sum(r['state'] == 'pruned' for r in tpe_rows)} pruned, "
          f"{trained} of the grid's {points * epochs} epochs ({trained / (points * epochs):.1%}), "
          f"best val R@1 {best_tpe:.2f} ({best_tpe - best_grid:+.2f}); replay more seeds with "
          f"benchmarks/prune_replay.py {out / 'runs' / 'sweeps' / 'val-grid'} --seeds 5 "
          f"--trials {VAL_TRIALS} --names val-tpe --margin 1 --share-of grid")


WORKERS_STORE = ["--shapes", "tiny", "--videos", "240", "--val-videos", "40", "--test-videos",
                 "8", "--heads", "meanp"]
WORKERS_GRID = "lr=1e-4,3e-4,1e-3,3e-3 temperature=0.05,0.1,0.2"  # 12 points


def workers(cache: str | None, out: Path, epochs: int, storage: str) -> None:
    """1, 2 and 4 workers (separate processes and folders) on one 12-point study at ``storage``:
    trials per minute; then the study's own cost per trial, without training."""
    if cache is None:
        cache = str((out / "cache").resolve())
        avr(out, "bench", "store", *WORKERS_STORE, "--out", cache)
    for count in (1, 2, 4):
        name = f"workers-{count}-{int(time.time())}"
        args = ["sweep", "--cache", cache, "--head", "meanp", "--batch-size", "16", "--epochs",
                str(epochs), "--device", "cpu", "--name", name, "--storage", storage,
                "--grid", WORKERS_GRID]
        started = time.perf_counter()
        running = []
        for k in range(count):
            folder = out / name / f"worker-{k}"
            folder.mkdir(parents=True)
            running.append(subprocess.Popen([sys.executable, "-m", "avr", *args], cwd=folder,
                                            stdout=subprocess.DEVNULL))
        assert all(worker.wait() == 0 for worker in running)
        seconds = time.perf_counter() - started
        print(f"{count} worker(s), 12 trials x {epochs} epochs: {seconds:.1f} s, "
              f"{12 / seconds * 60:.1f} trials/min")
    per_trial = study_overhead(storage, epochs)
    print(f"the study's own calls per trial (lock, ask, options, {epochs} reports, tell), "
          f"no training: {per_trial * 1000:.1f} ms")


def study_overhead(storage: str, epochs: int, trials: int = 24) -> float:
    """Seconds per trial of the calls a worker makes to the study, timed without training."""
    from avr.fuse import sweep as sweeps
    from avr.fuse.sweep.worker import Heartbeat
    from avr.fuse.trainer import TrainConfig

    optuna = sweeps.optuna_module()
    sweeps.quiet_optuna()
    name = f"overhead-{int(time.time())}"
    plan = sweeps.SweepPlan("unused", "lr=1e-5:1e-2:log", "random", trials, False,
                            TrainConfig(head="meanp"))
    db = sweeps.open_storage(storage)
    study = optuna.create_study(study_name=name, storage=db, direction="maximize")
    study.set_user_attr(sweeps.PLAN_ATTR, plan.to_json())
    lock, heartbeat = sweeps.StudyLock(storage, name), Heartbeat(db)
    worker = sweeps.worker_identity()
    started = time.perf_counter()
    for _ in range(trials):
        with lock:
            (trial, _), = sweeps.take_trials(study, plan, 1, heartbeat, worker)
        trial.set_user_attr("run_dir", "/nowhere")
        for epoch in range(1, epochs + 1):
            trial.report(float(epoch), epoch)
        trial.set_user_attr("seconds", 0.0)
        study.tell(trial, float(epochs))
        db.get_trial(trial._trial_id)
    return (time.perf_counter() - started) / trials


def resume(cache: str, out: Path, epochs: int) -> None:
    args = ["sweep", "--cache", cache, "--head", "xpool", "--epochs", str(epochs), *DEMO,
            "--grid", "lr=1e-3,2e-3,3e-3,5e-3", "--name", "xpool-kill"]
    worker = subprocess.Popen([sys.executable, "-m", "avr", *args], cwd=out,
                              stdout=subprocess.DEVNULL)
    csv_path = out / "runs" / "sweeps" / "xpool-kill" / "trials.csv"
    while not csv_path.exists():  # the first trial has finished
        time.sleep(0.2)
    time.sleep(1.0)  # into the next trial
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    before = trials(out, "xpool-kill")
    again = avr(out, *args)
    after = trials(out, "xpool-kill")
    print(f"killed after {len(before)} finished trial(s); resumed in {again:.1f} s; final "
          + ", ".join(f"trial {r['trial']} {r['state']} lr={r['lr']}" for r in after))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("figure", choices=["parallel", "prune", "resume", "prune-val",
                                           "workers"])
    parser.add_argument("--cache", help="The store (default: avr-demo/cache; prune-val writes "
                                        "its own)")
    parser.add_argument("--out", default="sweep-bench")
    parser.add_argument("--storage", help="workers: the study's database (a PostgreSQL URL)")
    parser.add_argument("--epochs", type=int, help="Epochs per trial (default: 100 for "
                                                   "parallel and resume, 30 for prune, 6 for "
                                                   "prune-val, 2 for workers).")
    options = parser.parse_args()
    out = Path(options.out) / options.figure
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    epochs = options.epochs or {"prune": 30, "prune-val": 6, "workers": 2}.get(options.figure,
                                                                                100)
    writes_store = options.figure in ("prune-val", "workers")
    cache = options.cache or (None if writes_store else "avr-demo/cache")
    cache = cache and str(Path(cache).resolve())
    if options.figure == "workers":
        workers(cache, out, epochs, options.storage or "sqlite:///" + str(
            (out / "study.db").resolve()))
    else:
        {"parallel": parallel, "prune": prune, "resume": resume, "prune-val": prune_val}[
            options.figure](cache, out, epochs)
