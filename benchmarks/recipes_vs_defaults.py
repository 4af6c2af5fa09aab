"""The recipes against the defaults before them, on a VATEX-shaped generated store (BENCHMARKS.md).

    python benchmarks/recipes_vs_defaults.py --videos 150 --val-videos 60 --test-videos 10 \
        --out recipes-bench --base fd4ff98

Writes `avr bench store --videos N --like vatex --heads xpool,tefal` (VATEX's per-row shapes,
captions and split proportions unless --val-videos/--test-videos size those splits, only the
arrays the two heads read), unpacks avr at ``--base`` (the
commit before recipes) with `git archive`, then trains each head with no flag but the device,
once with this checkout (the head's recipe for VATEX) and once with the earlier avr (its
defaults), one run at a time, and prints for each: the schedule the run resolved, the best val
R@1, the wall time and the load average seen around it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# Runs avr's CLI from the package under ``code``. An editable install puts a finder for avr
# ahead of sys.path, which would make every variant run this checkout: it is dropped first.
LAUNCH = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path.insert(0, sys.argv.pop(1))
import avr, avr.cli
assert avr.__file__.startswith(sys.path[0]), (avr.__file__, sys.path[0])
sys.argv[0] = "avr"
avr.cli.main()
"""


def avr(code: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-c", LAUNCH, str(code.resolve()), *args], check=True,
                   env={**os.environ, "COLUMNS": "200"})


def train(code: Path, store: Path, head: str, run_dir: Path) -> dict:
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    avr(code, "train", "--cache", str(store), "--head", head, "--device", "cpu",
        "--run-dir", str(run_dir))
    seconds = time.perf_counter() - started
    with open(run_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    config = json.loads((run_dir / "config.json").read_text())["train"]
    best = max(rows, key=lambda row: float(row["val_r1"]))
    return {"epochs": config["epochs"], "batch": config["batch_size"], "lr": config["lr"],
            "pairs": config.get("pairs", "one"), "best_val_r1": float(best["val_r1"]),
            "best_epoch": int(best["epoch"]), "seconds": seconds,
            "load": (load_before, os.getloadavg()[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=150)
    parser.add_argument("--val-videos", type=int, help="Default: VATEX's share of --videos.")
    parser.add_argument("--test-videos", type=int, help="Default: VATEX's share of --videos.")
    parser.add_argument("--out", type=Path, default=Path("recipes-bench"))
    parser.add_argument("--base", default="fd4ff98", help="The commit before recipes.")
    parser.add_argument("--heads", default="xpool,tefal")
    args = parser.parse_args()
    heads = args.heads.split(",")
    store, before = args.out / "store", args.out / "before"
    if not store.exists():
        sizes = [*(["--val-videos", str(args.val_videos)] if args.val_videos else []),
                 *(["--test-videos", str(args.test_videos)] if args.test_videos else [])]
        avr(REPO, "bench", "store", "--videos", str(args.videos), *sizes, "--like", "vatex",
            "--heads", args.heads, "--out", str(store))
    if not before.exists():
        before.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    results = {}
    for head in heads:
        for variant, code in (("recipe", REPO), ("before", before)):
            results[f"{variant} {head}"] = train(code, store, head,
                                                 args.out / "runs" / f"{variant}-{head}")
            print(json.dumps({f"{variant} {head}": results[f"{variant} {head}"]}), flush=True)
    print("| run | epochs x batch, pairs | lr | best val R@1 (epoch) | wall | load |")
    print("|---|---|---:|---:|---:|---|")
    for name, r in results.items():
        print(f"| {name} | {r['epochs']} x {r['batch']}, {r['pairs']} | {r['lr']:g} | "
              f"{r['best_val_r1']:.1f} ({r['best_epoch']}) | {r['seconds']:.0f} s | "
              f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |")


if __name__ == "__main__":
    main()
