"""The sizes of `avr bench gpu`: chosen so that the whole check fits 8 minutes of one H100 or
H200 (``FULL``), or about a minute of a CPU on tiny shapes (``QUICK``: every row runs, no figure
means anything). BENCHMARKS.md states them beside the figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sizes:
    shapes: str  # the generated stores' per-row shapes: vatex (as `avr extract`) | tiny
    # the correctness store: train, val and test videos, captions per video; each head trains
    # check_steps batches of check_batch pairs
    check_videos: tuple[int, int, int]
    check_captions: int
    check_batch: int
    check_steps: int
    stacked_trials: int  # trials of each stackable head trained stacked, then one at a time
    stacked_epochs: int
    # the figure store: train videos (figure_batch pairs a step), val videos (the sweep's
    # validation), 10 captions per video; figure_steps timed steps after one warm-up step
    figure_videos: tuple[int, int]
    figure_batch: int
    figure_steps: int
    stream_buffer_batches: int  # the streamed figure's shuffle buffer, in batches
    eval_scale: float  # of VATEX's 15,000 x 1,500 test pairs; 1.0: measured whole
    eval_reference_pairs: int  # scored one pair at a time beside the chunked path
    sweep_trials: int  # X-Pool trials, stacked and one at a time
    sweep_epochs: int
    extract_clips: int  # generated 10 s 360p clips (extract_seconds long)
    extract_seconds: float
    extract_workers: int  # decode processes; 0: one per CPU core of the machine
    real_size_backbones: bool  # ViT-B/32, Swin-T, AST, RoBERTa with random weights
    cache_gigabytes: float  # the store read into device memory beside a raw read


def head_options(sizes: Sizes, head: str) -> dict[str, Any]:
    """A head's options at these sizes: on tiny shapes the demo's smaller AVIGATE and HTAV (its
    32-wide features need neither four layers nor a 256-wide hierarchy), else the defaults."""
    from avr.demo import DEMO_HEAD_TRAINING

    if sizes.shapes != "tiny":
        return {}
    return dict(DEMO_HEAD_TRAINING.get(head, {}).get("head_options", {}))


FULL = Sizes(shapes="vatex", check_videos=(32, 8, 4), check_captions=2, check_batch=8,
             check_steps=3, stacked_trials=3, stacked_epochs=2, figure_videos=(512, 32),
             figure_batch=128, figure_steps=3, stream_buffer_batches=2, eval_scale=1.0,
             eval_reference_pairs=500, sweep_trials=16, sweep_epochs=2, extract_clips=16,
             extract_seconds=10.0, extract_workers=0, real_size_backbones=True,
             cache_gigabytes=2.0)

QUICK = Sizes(shapes="tiny", check_videos=(24, 8, 4), check_captions=2, check_batch=8,
              check_steps=2, stacked_trials=2, stacked_epochs=1, figure_videos=(32, 8),
              figure_batch=8, figure_steps=1, stream_buffer_batches=2, eval_scale=0.005,
              eval_reference_pairs=20, sweep_trials=2, sweep_epochs=1, extract_clips=1,
              extract_seconds=2.0, extract_workers=1, real_size_backbones=False,
              cache_gigabytes=0.01)
