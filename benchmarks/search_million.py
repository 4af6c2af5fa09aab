"""First-stage search over a million videos: build time, per-query latency and recall@10.

Synthetic vectors stand in for mean-pooled CLIP frames: ``--n`` unit vectors of ``--dim``
dimensions around ``--clusters`` Gaussian centres with isotropic noise ``--noise`` times the
centres' scale (1.0: two videos of one cluster have cosine ~0.5, of two clusters ~0), and
``--queries`` new points of the same distribution. Recall depends on that distribution: with
more noise every distance concentrates in 512 dimensions and no index beats a scan. Each index kind is
built through avr's own ``make_index`` (the code `avr index build` runs) and searched through
``avr.evaluate.index.search``; recall@10 is against exact inner-product search (IndexFlatIP)
on the same queries. Latency is reported two ways: the batch of all queries divided by their
number (throughput), and one query at a time (``--single`` of them, the interactive case).

    python benchmarks/search_million.py                       # 1M x 512, IVF
    python benchmarks/search_million.py --n 200000 --kinds ivf,hnsw
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from avr.evaluate import index as first_stage

NPROBES = (1, 8, 32, 64, 128)
EF_SEARCHES = (16, 64, 128, 256)
BLOCK = 100_000


def clustered(n: int, dim: int, centres: np.ndarray, seed: int, noise: float) -> np.ndarray:
    """``n`` unit vectors, generated in float32 blocks (a million x 512 is 2 GB)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        block = centres[rng.integers(len(centres), size=stop - start)]
        block += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall_at_10(truth: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)]))


def timed_search(split_index, queries: np.ndarray, single: int, **knob):
    """(rows of the batch search, ms per query in the batch, ms per query one at a time)."""
    started = time.perf_counter()
    _, rows = first_stage.search(split_index, queries, 10, **knob)
    batch_ms = (time.perf_counter() - started) * 1000 / len(queries)
    started = time.perf_counter()
    for query in queries[:single]:
        first_stage.search(split_index, query[None], 10, **knob)
    single_ms = (time.perf_counter() - started) * 1000 / single
    return rows, batch_ms, single_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--kinds", default="ivf", help="comma-separated: flat, ivf, hnsw")
    args = parser.parse_args()

    import faiss

    centres = np.random.default_rng(0).standard_normal((args.clusters, args.dim),
                                                       dtype=np.float32)
    started = time.perf_counter()
    vectors = clustered(args.n, args.dim, centres, seed=1, noise=args.noise)
    queries = clustered(args.queries, args.dim, centres, seed=2, noise=args.noise)
    print(f"{args.n:,} x {args.dim} vectors, {args.clusters} clusters, noise {args.noise}, "
          f"{args.queries} queries, "
          f"{faiss.omp_get_max_threads()} threads; generated in "
          f"{time.perf_counter() - started:.1f} s", flush=True)

    rows = ["| index | build s | setting | ms/query (batch) | ms/query (single) | recall@10 |",
            "|---|---:|---|---:|---:|---:|"]
    exact, _, _ = first_stage.make_index(vectors, "flat")
    exact_index = first_stage.SplitIndex("bench", "flat", {}, exact,
                                         np.arange(args.n, dtype=np.int64))
    truth, batch_ms, single_ms = timed_search(exact_index, queries, args.single)
    rows.append(f"| flat (exact) | 0 | - | {batch_ms:.2f} | {single_ms:.2f} | 1.000 |")
    print(rows[-1], flush=True)
    del exact, exact_index

    for kind in args.kinds.split(","):
        if kind == "flat":
            continue
        started = time.perf_counter()
        index, _, params = first_stage.make_index(vectors, kind, nlist=args.nlist)
        build_s = time.perf_counter() - started
        split_index = first_stage.SplitIndex("bench", kind, params, index,
                                             np.arange(args.n, dtype=np.int64))
        name = (f"ivf nlist={params['nlist']}" if kind == "ivf"
                else f"hnsw M={params['m']} efC={params['ef_construction']}")
        settings = ([("nprobe", p) for p in NPROBES if p <= params["nlist"]] if kind == "ivf"
                    else [("ef_search", e) for e in EF_SEARCHES])
        for knob, value in settings:
            found, batch_ms, single_ms = timed_search(split_index, queries, args.single,
                                                      **{knob: value})
            rows.append(f"| {name} | {build_s:.1f} | {knob}={value} | {batch_ms:.3f} | "
                        f"{single_ms:.2f} | {recall_at_10(truth, found):.3f} |")
            print(rows[-1], flush=True)
        del index, split_index
    print("\n".join(rows))


if __name__ == "__main__":
    main()
