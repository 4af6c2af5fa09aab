"""The cost of avr's integrity checks on a store with VATEX's row counts: listing an array's
chunk keys, reading rows and loading a split with and without looking for absent chunks, and
`avr cache verify` over the whole store.

A listing costs per chunk file, not per byte, so the per-row shapes here are small while the
rows and their chunking are VATEX's: 28,991 videos in chunks of 4 rows (the chunking 1,212 x
768 audio tokens give: 7,248 chunk files per video array) and 289,910 captions.

    python benchmarks/store_integrity.py                 # VATEX's rows, in a temporary folder
    python benchmarks/store_integrity.py --videos 2000 --workdir /mnt/nvme
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from avr.store import integrity, read, schema
from avr.store.group import create_store, open_store
from avr.store.schema import AudioParams, BackboneInfo, CacheSpec
from avr.store.splits import load_split

CHUNK_ROWS = 4  # VATEX's video chunking (8 MB of 1,212 x 768 fp16 audio tokens per chunk)


def small_spec() -> CacheSpec:
    info = BackboneInfo("bench", "random:0", "none", "0")
    return CacheSpec(dataset="bench", num_frames=4, image_size=32, clip_dim=16, clip_text_len=4,
                     swin_channels=(4, 4, 4), swin_grids=(1, 1, 1), ast_dim=4, roberta_dim=4,
                     roberta_len=4, audio=AudioParams(), ast_freq_patches=1, ast_time_patches=2,
                     backbones={k: info for k in ("clip", "swin", "ast", "roberta")})


def build(path: Path, videos: int, captions_per_video: int) -> None:
    spec = small_spec()
    splits = ["train"] * (videos - 3000) + ["val"] * 1500 + ["test"] * 1500
    group = create_store(path, spec, [f"v{i}" for i in range(videos)], splits,
                                np.repeat(np.arange(videos), captions_per_video),
                                [f"c{j}" for j in range(videos * captions_per_video)],
                                video_chunk_rows=CHUNK_ROWS)
    rng = np.random.default_rng(0)
    for name, array in schema.array_layout(spec, videos, videos * captions_per_video,
                                           video_chunk_rows=CHUNK_ROWS).items():
        if name in schema.INDEX_ARRAYS:
            continue
        if array.dtype == np.bool_:
            group[name][:] = True
        else:
            group[name][:] = rng.standard_normal(array.shape).astype(array.dtype)


def seconds(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=28_991)
    parser.add_argument("--captions-per-video", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        store = Path(tmp) / "cache"
        start = time.perf_counter()
        build(store, args.videos, args.captions_per_video)
        group, _ = open_store(store)
        frames = group[schema.FRAME_EMBEDDINGS]
        print(f"store: {args.videos:,} videos, {read.chunk_count(frames):,} chunk files per "
              f"video array, built in {time.perf_counter() - start:.0f} s")
        listing = seconds(lambda: read.stored_chunks(frames))
        print(f"listing one video array's chunk keys: {listing * 1e3:.0f} ms")
        rows = np.arange(frames.shape[0] - 3000)
        plain = seconds(lambda: read._read(frames, rows))
        checked = seconds(lambda: read.read_rows(frames, rows))
        print(f"reading frame_embeddings of the train split: {plain:.2f} s unchecked, "
              f"{checked:.2f} s with the absent-chunk check "
              f"(+{(checked / plain - 1) * 100:.0f} %)")
        def load():
            load_split(store, "train", (schema.FRAME_EMBEDDINGS, schema.FRAME_MASK),
                       (schema.TEXT_EMBEDDINGS,))

        checked = seconds(load, repeat=2)
        every_chunk_is_stored = read.every_chunk_is_stored
        read.every_chunk_is_stored = lambda array: False  # absent chunks not looked for
        plain = seconds(load, repeat=2)
        read.every_chunk_is_stored = every_chunk_is_stored
        print(f"load_split(train: frames, mask, sentence embeddings): {plain:.2f} s without "
              f"looking for absent chunks, {checked:.2f} s with")
        report = integrity.verify_store(store)
        print(f"cache verify: {report.chunks:,} chunks, {report.bytes / 1e6:,.0f} MB decoded in "
              f"{report.seconds:.1f} s ({report.chunks / report.seconds:,.0f} chunks/s); "
              f"clean={report.clean}")


if __name__ == "__main__":
    main()
