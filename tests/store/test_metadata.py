"""A store whose array metadata was edited (a ``zarr.json`` changed by hand or damaged): `avr
cache verify` names what differs from the schema, and every reader refuses the store with one
line before it reads a row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avr.store import schema
from support.console import assert_one_line_error, ok, run_avr
from support.specs import make_tiny_spec
from support.stores import make_learnable_store

EDITS = {
    "dtype": (schema.FRAME_EMBEDDINGS, lambda meta: meta.update(data_type="int16"),
              "frame_embeddings: dtype int16, the schema says float16"),
    "shape per row": (schema.AUDIO_GLOBAL_TOKENS,
                      lambda meta: (meta.update(shape=[meta["shape"][0], 3, meta["shape"][2]]),
                                    _chunk_shape(meta).__setitem__(1, 3)),
                      "audio_global_tokens: shape per row (3, 24), the schema says (2, 24)"),
    "rows of the done mask": (schema.VIDEO_DONE,
                              lambda meta: meta.update(shape=[meta["shape"][0] + 5]),
                              "video_done: 77 rows, video_id has 72"),
    "chunking": (schema.TEXT_TOKEN_STATES, lambda meta: _chunk_shape(meta).__setitem__(1, 6),
                 "text_token_states: chunks"),
}


def _chunk_shape(meta: dict) -> list:
    return meta["chunk_grid"]["configuration"]["chunk_shape"]


@pytest.fixture(params=sorted(EDITS))
def edited(request, tmp_path) -> tuple[Path, str]:
    store = make_learnable_store(tmp_path / "cache", make_tiny_spec())
    name, edit, expected = EDITS[request.param]
    metadata_file = store / name / "zarr.json"
    metadata = json.loads(metadata_file.read_text())
    edit(metadata)
    metadata_file.write_text(json.dumps(metadata))
    return store, expected


def test_verify_names_what_the_edited_metadata_changed(edited):
    store, expected = edited
    done = run_avr("cache", "verify", store)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "disagrees with the schema" in done.stdout and expected in done.stdout


def test_train_refuses_edited_metadata_before_reading_a_row(edited, tmp_path):
    store, expected = edited
    done = run_avr("train", "--cache", store, "--head", "meanp", "--epochs", "1", "--device",
                   "cpu", "--run-dir", tmp_path / "run")
    assert_one_line_error(done, str(store), "disagrees with the schema", expected)
    assert not (tmp_path / "run" / "config.json").exists()


def test_every_reader_refuses_a_dtype_edited_by_hand(tmp_path):
    store = make_learnable_store(tmp_path / "cache", make_tiny_spec())
    name, edit, expected = EDITS["dtype"]
    metadata = json.loads((store / name / "zarr.json").read_text())
    edit(metadata)
    (store / name / "zarr.json").write_text(json.dumps(metadata))
    report = json.loads(run_avr("cache", "verify", store, "--json").stdout)
    assert not report["clean"] and report["metadata"] == [expected]
    for command in (["cache", "info", store], ["index", "build", store],
                    ["cache", "export", store, tmp_path / "out.h5"]):
        assert_one_line_error(run_avr(*command), str(store), "disagrees with the schema",
                              expected)


def test_a_store_as_written_verifies_clean(tmp_path):
    store = make_learnable_store(tmp_path / "cache", make_tiny_spec())
    report = json.loads(ok(run_avr("cache", "verify", store, "--json")).stdout)
    assert report["clean"] and report["metadata"] == []
