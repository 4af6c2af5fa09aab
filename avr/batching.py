"""Running a function over the rows of its input one batch at a time.

Feature extraction (frames, audio and captions through the backbones) and scoring (a head's
``encode_videos`` and ``encode_texts`` over a split) do the same thing: call a model on row
batches so that memory holds one batch's activations, and concatenate what comes back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch

# What ``map_batches`` slices by rows: a tensor, a list, or a dict of tensors sharing rows.
Batchable = Union[Mapping[str, torch.Tensor], torch.Tensor, Sequence]
Outputs = dict[str, torch.Tensor]


def row_count(rows: Batchable) -> int:
    """Rows of a tensor, a list, or a dict of tensors sharing their first dimension."""
    if isinstance(rows, Mapping):
        return next(iter(rows.values())).shape[0]
    return len(rows)


def take_rows(rows: Batchable, start: int, stop: int) -> Batchable:
    if isinstance(rows, Mapping):
        return {name: value[start:stop] for name, value in rows.items()}
    return rows[start:stop]


def map_batches(fn: Callable[[Batchable], Outputs], rows: Batchable, batch: int, *,
                out_device: str | torch.device | None = None) -> Outputs:
    """``fn`` over consecutive batches of at most ``batch`` rows of ``rows`` (a tensor, a list
    or a dict of tensors), its dicts of tensors concatenated row-wise; each output moves to
    ``out_device`` as it comes when given (the host, while the model runs on a GPU)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, row_count(rows), batch):
        for name, value in fn(take_rows(rows, start, start + batch)).items():
            parts.setdefault(name, []).append(value if out_device is None
                                              else value.to(out_device))
    return {name: torch.cat(values) for name, values in parts.items()}
