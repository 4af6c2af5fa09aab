"""Shared fixtures. Helpers the tests import live in ``tests/support/`` (on the path through
pyproject's ``pythonpath``); test folders mirror the packages of ``avr/``."""

from __future__ import annotations

import os
import sys

# The suite runs in two pytest-xdist workers (pyproject's addopts) on CI's two cores: one
# intra-op thread per process keeps the workers and the `avr` processes they start (which
# inherit it) from oversubscribing the cores. A value the environment sets is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file: give it the same count
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

from avr.device import intra_op_threads  # noqa: E402
from avr.store.schema import CacheSpec
from support.demo_runs import make_demo_runs
from support.specs import make_tiny_spec


@pytest.fixture
def tiny_spec() -> CacheSpec:
    return make_tiny_spec()


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (for many ops on tiny tensors, where handing work
    between threads costs more than it saves)."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    """Generated clips, their store with thumbnails, and tefal and xpool runs on it
    (support.demo_runs), made once for the tests of the report, the service and the pages."""
    return make_demo_runs(tmp_path_factory.mktemp("demo-runs"))
