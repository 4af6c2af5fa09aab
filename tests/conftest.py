"""Shared fixtures. Helpers the tests import live in ``tests/support/`` (on the path through
pyproject's ``pythonpath``); test folders mirror the packages of ``avr/``."""

from __future__ import annotations

import pytest

from avr.device import intra_op_threads
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
