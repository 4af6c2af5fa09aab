"""The sweep figures of BENCHMARKS.md, on the demo cache (`avr demo` makes it), through `avr`.

    python benchmarks/sweep_targets.py parallel --cache avr-demo/cache   # xpool, 16 configs
    python benchmarks/sweep_targets.py prune --cache avr-demo/cache      # tefal, TPE + prune
    python benchmarks/sweep_targets.py resume --cache avr-demo/cache     # SIGKILL, then resume

benchmarks/prune_replay.py replays the prune figure's grid through other pruners.

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
    parser.add_argument("figure", choices=["parallel", "prune", "resume"])
    parser.add_argument("--cache", default="avr-demo/cache")
    parser.add_argument("--out", default="sweep-bench")
    parser.add_argument("--epochs", type=int, help="Epochs per trial (default: 100 for "
                                                   "parallel and resume, 30 for prune).")
    options = parser.parse_args()
    out = Path(options.out) / options.figure
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    epochs = options.epochs or (30 if options.figure == "prune" else 100)
    {"parallel": parallel, "prune": prune, "resume": resume}[options.figure](
        str(Path(options.cache).resolve()), out, epochs)
