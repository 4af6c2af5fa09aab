"""Random head inputs shaped by the schema, and parameters moved off their init, for head tests."""

from __future__ import annotations

import numpy as np
import torch

from avr.store import schema


def random_rows(spec, names, n, seed=0):
    """Random head inputs shaped by the schema: 16-bit floats, masks all True."""
    generator = torch.Generator().manual_seed(seed)
    layout = schema.array_layout(spec, n, n)
    rows = {}
    for name in names:
        shape = layout[name].shape
        if layout[name].dtype is np.bool_:
            rows[name] = torch.ones(shape, dtype=torch.bool)
        else:
            rows[name] = torch.randn(shape, generator=generator).half()
    return rows


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its init so tests see every weight act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return module
