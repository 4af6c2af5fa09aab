"""`avr search` start-up and per-query time on a run, as a user meets them.

    python benchmarks/search_latency.py --run avr-demo/runs/tefal [--repeats 3] [--queries 50]

For each repeat: the wall time of `avr search QUERY --run RUN` (a new process: imports, loading
the run, the text towers and the videos, one query), then of `avr search --queries FILE` with
QUERIES of the store's captions, whose own report splits loading from answering. Prints every
figure and the load average; BENCHMARKS.md keeps them with the machine and date.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import store_captions  # noqa: E402

QUERY = "a red circle moves while a drum beats"


def avr(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("avr")), *args],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "COLUMNS": "200"})
    return time.perf_counter() - started, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(store_captions(args.run)[:args.queries]) + "\n")
    for repeat in range(args.repeats):
        one, _ = avr("search", QUERY, "--run", str(args.run), "--device", "cpu", "--k", "10")
        many, out = avr("search", "--queries", handle.name, "--run", str(args.run), "--device",
                        "cpu", "--k", "10")
        loaded, answered = map(float, re.search(r"loaded in ([\d.]+) s; \d+ queries in "
                                                r"([\d.]+) s", out).groups())
        print(f"repeat {repeat + 1}: one query {one:.2f} s wall; {args.queries} queries "
              f"{many:.2f} s wall (loaded in {loaded:.2f} s, {1000 * answered / args.queries:.1f}"
              f" ms per query); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
