"""The store checks (``support.store_tests.StoreTests``) on a local folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.store_tests import StoreTests


class TestLocalStore(StoreTests):
    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def folder(cls, tmp_path_factory):
        cls.root = tmp_path_factory.mktemp("stores")

    @classmethod
    def location(cls, name: str) -> Path:
        return cls.root / name
