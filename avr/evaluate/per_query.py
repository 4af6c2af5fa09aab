"""`avr eval --per-query FILE`: one row per caption of the evaluated split, for scripts and for
`avr report`: what each query retrieved, where its own video ranked, and what each modality
contributed.

Columns (a contract; CSV and Parquet hold the same ones):

- ``caption_row`` (the caption's row in the store: its id), ``caption``, ``tag``, ``video``
  (the ground-truth video id), ``rank`` (1-based, ties pessimistic as the metrics count them;
  the number of videos + 1 when the video failed extraction), ``score`` (the head's score of the
  caption with its own video; empty then);
- ``top1_video``, ``top1_score``, ... ``topK_video``, ``topK_score``: the K best videos;
- for a head that reads audio, the caption's own video scored again with its audio left out
  (``visual_score``, ``visual_rank``: `avr eval --modalities v`) and with its frames left out
  (``audio_score``, ``audio_rank``: ``--modalities a``), so that ``visual_rank - rank`` is what
  the audio bought;
- where the head explains a pair (``RetrievalHead.explain``): ``audio_gate`` (the mean of its
  gate values), ``threshold`` (HTAV's learned audio threshold) and ``top_frame`` (the frame the
  caption attends to most).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from avr.errors import AvrError
from avr.fuse.heads import base

FORMATS = (".csv", ".parquet")
DEFAULT_TOP_K = 10
EXPLAIN_BLOCK = 256  # captions explained at once (HTAV's alignment is [P, L, 101] per block)


def check_path(path: Path) -> None:
    """Refuse a file whose suffix names no format, or Parquet without pyarrow, before any work."""
    if path.suffix.lower() not in FORMATS:
        raise AvrError(f"--per-query {path}: expected a .csv or .parquet file")
    if path.suffix.lower() == ".parquet":
        from avr.extras import require

        require("pyarrow.parquet", "--per-query FILE.parquet")


def top_videos(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[Q, k] columns of the k best videos of each caption, best first, and their scores."""
    k = min(k, sim.shape[1])
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
    top = np.take_along_axis(part, order, 1)
    return top, np.take_along_axis(sim, top, 1)


def own_scores(sim: np.ndarray, caption_video: np.ndarray) -> np.ndarray:
    """[Q] each caption's score with its own video; NaN when that video failed extraction."""
    scores = np.full(len(caption_video), np.nan, dtype=np.float64)
    present = caption_video >= 0
    scores[present] = sim[np.flatnonzero(present), caption_video[present]]
    return scores


def explanation_columns(explained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One value per explained pair from ``head.explain``'s tensors: the mean gate, the mean
    threshold and the frame of largest attention, for the keys the head returns."""
    columns = {}
    if base.EXPLAIN_AUDIO_GATE in explained:
        gates = explained[base.EXPLAIN_AUDIO_GATE]
        columns["audio_gate"] = gates.reshape(len(gates), -1).mean(1)
    if base.EXPLAIN_THRESHOLD in explained:
        thresholds = explained[base.EXPLAIN_THRESHOLD]
        columns["threshold"] = thresholds.reshape(len(thresholds), -1).mean(1)
    if base.EXPLAIN_FRAME_ATTENTION in explained:
        columns["top_frame"] = explained[base.EXPLAIN_FRAME_ATTENTION].argmax(1)
    return columns


def explain_all(explain_rows, caption_video: np.ndarray) -> dict[str, np.ndarray]:
    """``explanation_columns`` for every caption (NaN where its video failed), explaining
    ``EXPLAIN_BLOCK`` captions at a time through ``explain_rows(rows) -> head.explain`` output."""
    present = np.flatnonzero(caption_video >= 0)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(present), EXPLAIN_BLOCK):
        block = explanation_columns(explain_rows(present[start:start + EXPLAIN_BLOCK].tolist()))
        for name, values in block.items():
            parts.setdefault(name, []).append(values)
    columns = {}
    for name, values in parts.items():
        column = np.full(len(caption_video), np.nan)
        column[present] = np.concatenate(values)
        columns[name] = column
    return columns


def per_query_table(sim: np.ndarray, caption_video: np.ndarray, ranks: np.ndarray,
                    video_ids: list[str], caption_video_ids: list[str], captions: list[str],
                    tags: list[str], caption_rows: np.ndarray, k: int = DEFAULT_TOP_K, *,
                    modality_sims: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                    explained: dict[str, np.ndarray] | None = None) -> dict[str, list]:
    """The columns of the module docstring, in order. ``modality_sims`` maps "visual" and
    "audio" to (the split's scores with the other modality left out, their ranks)."""
    top, top_scores = top_videos(sim, k)
    table: dict[str, list] = {
        "caption_row": [int(r) for r in caption_rows], "caption": list(captions),
        "tag": list(tags), "video": list(caption_video_ids),
        "rank": [int(r) for r in ranks], "score": _floats(own_scores(sim, caption_video))}
    for place in range(top.shape[1]):
        table[f"top{place + 1}_video"] = [video_ids[v] for v in top[:, place]]
        table[f"top{place + 1}_score"] = _floats(top_scores[:, place])
    for name, (modality_sim, modality_ranks) in (modality_sims or {}).items():
        table[f"{name}_score"] = _floats(own_scores(modality_sim, caption_video))
        table[f"{name}_rank"] = [int(r) for r in modality_ranks]
    for name, values in (explained or {}).items():
        table[name] = ([None if np.isnan(v) else int(v) for v in values] if name == "top_frame"
                       else _floats(values))
    return table


def _floats(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else round(float(v), 6) for v in values]


def write_per_query(table: dict[str, list], path: Path) -> Path:
    """``table`` as CSV (empty cells for missing values) or Parquet, by ``path``'s suffix."""
    check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        from avr.extras import require

        pyarrow = require("pyarrow", "--per-query FILE.parquet")
        require("pyarrow.parquet", "--per-query FILE.parquet").write_table(
            pyarrow.table(table), path)
        return path
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(table)
        writer.writerows(zip(*(["" if v is None else v for v in column]
                               for column in table.values())))
    return path
