"""The `cache` and `index` commands take the store as their argument or as `--cache`, and print
their result as JSON on stdout with `--json`."""

from __future__ import annotations

import json

from support.console import assert_one_line_error, ok, run_avr
from support.specs import make_tiny_spec
from support.stores import make_learnable_store


def test_every_cache_and_index_command_takes_cache_and_prints_json(tmp_path):
    store = make_learnable_store(tmp_path / "cache", make_tiny_spec())
    info = json.loads(ok(run_avr("cache", "info", "--cache", store, "--json")).stdout)
    assert info["path"] == str(store) and info["videos"]["done"] == 72
    verified = json.loads(ok(run_avr("cache", "verify", "--cache", store, "--json")).stdout)
    assert verified["clean"] and verified["store"] == str(store)
    released = json.loads(ok(run_avr("cache", "break-lock", "--cache", store, "--json")).stdout)
    assert released == {"store": str(store), "removed": None}
    built = json.loads(ok(run_avr("index", "build", "--cache", store, "--json")).stdout)
    assert built["index"] == str(store / "index") and built["splits"]["test"]["videos"] == 12


def test_a_store_given_twice_differently_is_refused(tmp_path):
    done = run_avr("cache", "info", tmp_path / "one", "--cache", tmp_path / "two")
    assert_one_line_error(done, "given twice", str(tmp_path / "one"), str(tmp_path / "two"))
