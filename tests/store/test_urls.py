"""Stores at fsspec URLs: the store checks (``support.store_tests.StoreTests``) on a
``memory://`` store, and what only URLs have: a protocol whose package is missing, an unknown
protocol, ``file://`` URLs naming local stores in every command."""

from __future__ import annotations

import fsspec
import pytest
from fsspec.registry import known_implementations

from avr.errors import AvrError
from avr.store.location import reachable_location
from support.store_tests import StoreTests, run_in_process

ROOT = "/avr-test"


class TestMemoryStore(StoreTests):
    """A ``memory://`` store lives in one process: the command line runs in the test's."""

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def clean_memory_filesystem(cls):
        yield
        memory = fsspec.filesystem("memory")
        if memory.exists(ROOT):
            memory.rm(ROOT, recursive=True)

    @classmethod
    def location(cls, name: str) -> str:
        return f"memory:/{ROOT}/{name}"

    @classmethod
    def avr(cls, *args):
        return run_in_process(*args)


def test_a_protocol_whose_package_is_missing_names_the_package(monkeypatch):
    monkeypatch.setitem(known_implementations, "avrmissing",
                        {"class": "avr_missing_package.FileSystem",
                         "err": "Install avr-missing-package to access avrmissing://"})
    with pytest.raises(AvrError, match="avr-missing-package"):
        reachable_location("avrmissing://bucket/cache")


def test_an_unknown_protocol_is_refused():
    with pytest.raises(AvrError, match="nosuchprotocol"):
        reachable_location("nosuchprotocol://bucket/cache")


def test_a_file_url_is_the_local_path(tmp_path):
    assert reachable_location((tmp_path / "cache").as_uri()) == tmp_path / "cache"


def test_file_urls_name_local_stores_in_every_command(tmp_path, capsys):
    import json as json_module

    from avr.cli import main
    from support.specs import make_tiny_spec
    from support.stores import make_learnable_store

    store = make_learnable_store(tmp_path / "cache", make_tiny_spec())
    url = store.as_uri()  # file:///...: a pathlib.Path would make it file:/...
    main(["cache", "info", url, "--json"])
    assert json_module.loads(capsys.readouterr().out)["path"] == str(store)
    main(["train", "--cache", url, "--head", "meanp", "--epochs", "1", "--batch-size", "16",
          "--device", "cpu", "--run-dir", str(tmp_path / "run")])
    saved = json_module.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["cache"]["path"] == str(store.resolve())
    main(["index", "build", url])
    assert (store / "index" / "index.json").is_file()
    main(["eval", "--run", str(tmp_path / "run"), "--cache", url, "--device", "cpu",
          "--rerank-k", "2", "--index", (store / "index").as_uri()])
    assert "rerank@2" in capsys.readouterr().out
