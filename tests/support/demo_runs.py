"""A demo-like run for the pages: a handful of generated clips (the demo's looks and sounds)
extracted with the tiny backbones, thumbnails and paths included, and heads trained on it for a
few epochs: enough for a page to show results, not to retrieve well."""

from __future__ import annotations

from pathlib import Path

from avr.device import intra_op_threads
from avr.extract.demo_data import generate_demo
from avr.extract.pipeline import extract
from avr.fuse import trainer
from avr.fuse.trainer import TrainConfig
from support.store_checks import demo_extract_config

QUICK = dict(epochs=3, batch_size=8, lr=3e-3, warmup=0.0, device="cpu", pairs="all")


def make_demo_runs(root: Path, heads: tuple[str, ...] = ("tefal", "xpool")) -> dict[str, Path]:
    """``root/data`` (clips), ``root/cache`` (the store) and a run per head under ``root/runs``."""
    data = generate_demo(root / "data", seed=0, num_looks=2)
    cache = root / "cache"
    with intra_op_threads(1):
        extract(demo_extract_config(data, cache, 4))
        runs = {head: root / "runs" / head for head in heads}
        for head, run in runs.items():
            trainer.train(cache, TrainConfig(head=head, **QUICK), run)
    return {"data": data, "cache": cache, **runs}
