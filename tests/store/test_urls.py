"""Stores on fsspec URLs: `avr extract` writes, resumes, refuses and overwrites a store at a
``memory://`` URL exactly as it does a local directory, and `avr cache info` reads it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import fsspec
from support import media
import pytest
from fsspec.registry import known_implementations
from support.store_checks import assert_same_store, demo_extract_config

from avr.errors import AvrError, CacheMismatchError
from avr.extract.demo_data import generate_demo
from avr.extract.pipeline import extract
from avr.store import schema
from avr.store.group import open_store
from avr.store.info import cache_info
from avr.store.location import reachable_location, store_filesystem

URL = "memory://avr-test/cache"
CHUNK = 2


@pytest.fixture(autouse=True)
def clean_memory_filesystem():
    memory = fsspec.filesystem("memory")
    yield
    if memory.exists("/avr-test"):
        memory.rm("/avr-test", recursive=True)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, num_looks=1)


@pytest.fixture(scope="module")
def local_store(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "cache"
    extract(demo_extract_config(demo_root, out, CHUNK))
    return out


def test_a_store_at_a_url_equals_the_local_store(demo_root, local_store):
    summary = extract(demo_extract_config(demo_root, URL, CHUNK))
    assert summary.out == URL and summary.done == summary.videos == 6
    assert summary.bytes_on_disk > 0
    assert_same_store(local_store, URL)


def test_rerun_on_a_url_recomputes_nothing(demo_root):
    extract(demo_extract_config(demo_root, URL, CHUNK))
    summary = extract(demo_extract_config(demo_root, URL, CHUNK))
    assert summary.done_now == 0 and summary.done == 6


def test_failures_jsonl_is_written_at_the_url(tmp_path):
    root = tmp_path / "generic"
    (root / "videos").mkdir(parents=True)
    media.write_clip(root / "videos" / "good.mp4", seconds=1.0)
    media.write_garbage(root / "videos" / "garbage.mp4")
    with (root / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "caption", "split"])
        writer.writerow(["good", "a good clip", "train"])
        writer.writerow(["garbage", "a broken clip", "test"])
    extract(demo_extract_config(root, URL, CHUNK, dataset="generic"))
    fs, store = store_filesystem(URL)
    recorded = [json.loads(line) for line in
                fs.cat_file(f"{store}/{schema.FAILURES_FILE}").decode().splitlines()]
    assert [(r["video_id"], r["reason"]) for r in recorded] == [("garbage", "unreadable")]
    assert not fs.exists(f"{store}/{schema.FAILURES_FILE}.tmp")


def test_cache_info_reads_a_store_at_a_url(demo_root, local_store):
    extract(demo_extract_config(demo_root, URL, CHUNK))
    remote, local = cache_info(URL), cache_info(local_store)
    assert remote["path"] == URL
    assert remote["videos"] == local["videos"] and remote["captions"] == local["captions"]
    assert remote["arrays"].keys() == local["arrays"].keys()
    assert all(a["stored_bytes"] > 0 for a in remote["arrays"].values())


def test_a_store_at_a_url_made_with_other_parameters_is_refused(demo_root):
    extract(demo_extract_config(demo_root, URL, CHUNK, num_frames=4))
    with pytest.raises(CacheMismatchError, match="(?s)num_frames.*--overwrite"):
        extract(demo_extract_config(demo_root, URL, CHUNK, num_frames=5))


def test_overwrite_replaces_a_store_at_a_url(demo_root):
    extract(demo_extract_config(demo_root, URL, CHUNK, num_frames=4))
    extract(demo_extract_config(demo_root, URL, CHUNK, num_frames=5, overwrite=True))
    assert open_store(URL)[1].num_frames == 5


def test_a_url_holding_other_files_is_refused(demo_root):
    fsspec.filesystem("memory").pipe_file("/avr-test/cache/notes.txt", b"not a store")
    with pytest.raises(AvrError, match="not an avr store"):
        extract(demo_extract_config(demo_root, URL, CHUNK))


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


def test_a_head_trains_and_evaluates_on_a_store_at_a_url(tmp_path):
    from avr.evaluate.evaluator import EvalConfig, evaluate_run
    from avr.fuse import trainer
    from avr.fuse.trainer import TrainConfig
    from support.specs import make_tiny_spec
    from support.stores import make_learnable_store

    url = "memory://avr-test/learnable"
    try:
        make_learnable_store(url, make_tiny_spec())
        config = TrainConfig(head="meanp", epochs=6, batch_size=16, lr=1e-2, warmup=0.0,
                             device="cpu")
        result = trainer.train(url, config, tmp_path / "run")
        assert result.best_val_r1 > 4 * 100.0 / 12
        evaluated = evaluate_run(tmp_path / "run", config=EvalConfig(device="cpu"))
        assert evaluated.cache == url and evaluated.num_videos == 12
    finally:
        fsspec.filesystem("memory").rm("/avr-test/learnable", recursive=True)


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
