"""Extract settings for tests, array-by-array comparison of two stores, and the environment
of `avr` subprocesses (this checkout's code)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from avr.extract.pipeline import ExtractConfig
from avr.store import schema
from avr.store.group import open_store


def demo_extract_config(root: Path, out: Path | str, chunk_rows: int, **overrides
                        ) -> ExtractConfig:
    """The demo set with tiny backbones on the CPU, decoded in this process."""
    values = dict(dataset="demo", root=root, out=out, weights="tiny", workers=0,
                  chunk_rows=chunk_rows, device="cpu")
    values.update(overrides)
    return ExtractConfig(**values)


def demo_data(tmp_path_factory) -> Path:
    """The demo set with one look (6 clips), generated in a folder of its own."""
    from avr.extract.demo_data import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, num_looks=1)


def reference_extract(root: Path, tmp_path_factory, chunk_rows: int) -> Path:
    """``root`` extracted into a local folder of its own through the Python API."""
    from avr.extract.pipeline import extract

    out = tmp_path_factory.mktemp("reference") / "cache"
    extract(demo_extract_config(root, out, chunk_rows))
    return out


def read_store(path: Path) -> dict[str, np.ndarray]:
    group, spec = open_store(path)
    names = [*schema.array_layout(spec, 0, 0), *(n for n in schema.MEDIA_ARRAYS if n in group)]
    return {name: np.asarray(group[name][:]) for name in names}


def assert_same_store(a: Path, b: Path) -> None:
    left, right = read_store(a), read_store(b)
    assert left.keys() == right.keys()
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


def avr_env() -> dict[str, str]:
    """The environment for `python -m avr` subprocesses: this checkout on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": str(Path.cwd())}
