"""``StoreTests``: the checks every kind of store must pass, written once and run against each
kind (a local folder, ``memory://``, S3), as zarr-python's ``zarr.testing.StoreTests`` is.

A kind subclasses it (its class name starting with ``Test``) and gives, as class methods:

- ``location(name)``: where a store of this kind named ``name`` lives (a path or a URL);
- ``avr(*args)``: the `avr` command line run on it; by default the installed console script in a
  subprocess, as a user runs it (a ``memory://`` store lives in one process, so that kind runs
  the command line in the test's process).

Each check runs the command line on the kind's store and compares the result with the same
work done on a local store through the Python API (``reference``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from avr.extract.pipeline import extract
from avr.store.info import cache_info
from avr.store.location import store_filesystem
from support import media
from support.console import assert_one_line_error, ok, run_avr
from support.store_checks import (assert_same_store, demo_data, demo_extract_config,
                                 read_store, reference_extract)

CHUNK = 2
TINY = ("--backbones", "tiny", "--device", "cpu", "--workers", "0", "--chunk-rows", str(CHUNK))


class StoreTests:
    # ---- what a kind gives -----------------------------------------------------------------

    @classmethod
    def location(cls, name: str) -> str | Path:
        raise NotImplementedError

    @classmethod
    def avr(cls, *args) -> subprocess.CompletedProcess:
        return run_avr(*args, timeout=300)

    # ---- shared by the checks ----------------------------------------------------------------

    @classmethod
    def fresh(cls, name: str) -> str | Path:
        """A location of this kind that nothing has used."""
        return cls.location(f"{name}-{uuid.uuid4().hex[:8]}")

    def write_file(self, location, name: str, data: bytes) -> None:
        fs, root = store_filesystem(location)
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{name}", data)

    def read_file(self, location, name: str) -> bytes:
        fs, root = store_filesystem(location)
        fs.invalidate_cache()
        return fs.cat_file(f"{root}/{name}")

    @classmethod
    def extract(cls, root: Path, out, *extra) -> subprocess.CompletedProcess:
        return cls.avr("extract", "--dataset", "demo", "--root", root, "--out", out, *TINY,
                       *extra)

    @pytest.fixture(scope="class")
    @classmethod
    def demo_root(cls, tmp_path_factory) -> Path:
        return demo_data(tmp_path_factory)

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, demo_root, tmp_path_factory) -> Path:
        """The demo extracted into a local folder through the Python API."""
        return reference_extract(demo_root, tmp_path_factory, CHUNK)

    @pytest.fixture(scope="class")
    @classmethod
    def extracted(cls, demo_root):
        """The demo extracted by `avr extract` into a store of this kind (once per kind)."""
        out = cls.fresh("cache")
        ok(cls.extract(demo_root, out))
        return out

    # ---- the checks ----------------------------------------------------------------------------

    def test_extract_writes_the_same_arrays_as_a_local_extract(self, extracted, reference):
        assert_same_store(reference, extracted)

    def test_a_rerun_recomputes_nothing(self, extracted, demo_root):
        done = ok(self.extract(demo_root, extracted))
        assert "6/6 videos done (0 now, 0 failed)" in " ".join(done.stdout.split())

    def test_cache_info_reads_the_store(self, extracted, reference):
        found = json.loads(ok(self.avr("cache", "info", extracted, "--json")).stdout)
        local = cache_info(reference)
        assert found["path"] == str(extracted)
        assert found["videos"] == local["videos"] and found["captions"] == local["captions"]
        assert found["fingerprint"] == local["fingerprint"]
        assert all(array["stored_bytes"] > 0 for array in found["arrays"].values())

    def test_failures_are_recorded_in_failures_jsonl(self, tmp_path):
        root = tmp_path / "generic"
        (root / "videos").mkdir(parents=True)
        media.write_clip(root / "videos" / "good.mp4", seconds=1.0)
        media.write_garbage(root / "videos" / "garbage.mp4")
        with (root / "captions.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["video_id", "caption", "split"])
            writer.writerow(["good", "a good clip", "train"])
            writer.writerow(["garbage", "a broken clip", "test"])
        out = self.fresh("failures")
        ok(self.avr("extract", "--dataset", "generic", "--root", root, "--out", out, *TINY))
        recorded = [json.loads(line) for line in
                    self.read_file(out, "failures.jsonl").decode().splitlines()]
        assert [(r["video_id"], r["reason"]) for r in recorded] == [("garbage", "unreadable")]

    def test_a_store_made_with_other_parameters_is_refused(self, extracted, demo_root):
        done = self.extract(demo_root, extracted, "--frames", "5")
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "num_frames" in done.stderr and "--overwrite" in done.stderr

    def test_overwrite_replaces_a_store_made_with_other_parameters(self, demo_root):
        out = self.fresh("overwrite")
        extract(demo_extract_config(demo_root, out, CHUNK, num_frames=4))
        ok(self.extract(demo_root, out, "--frames", "5", "--overwrite"))
        assert read_store(out)["frame_embeddings"].shape[1] == 5

    def test_a_location_holding_other_files_is_refused_even_with_overwrite(self, demo_root):
        out = self.fresh("foreign")
        self.write_file(out, "notes.txt", b"not a store")
        assert_one_line_error(self.extract(demo_root, out), "not an avr store")
        assert_one_line_error(self.extract(demo_root, out, "--overwrite"), "notes.txt")
        assert self.read_file(out, "notes.txt") == b"not a store"

    def test_a_head_trains_indexes_and_evaluates_as_on_a_local_store(self, extracted, reference,
                                                                     tmp_path):
        """`avr train`, `avr index build` and `avr eval --rerank-k` on this kind's store give the
        numbers the same steps give on the local reference (same seed, CPU)."""
        from avr.evaluate.evaluator import EvalConfig, evaluate_run
        from avr.evaluate.index import build_index
        from avr.fuse import trainer
        from avr.fuse.trainer import TrainConfig

        ok(self.avr("train", "--cache", extracted, "--head", "meanp", "--epochs", "2",
                    "--batch-size", "2", "--device", "cpu", "--run-dir", tmp_path / "run"))
        assert json.loads((tmp_path / "run" / "config.json").read_text())["cache"]["path"] \
            == str(Path(extracted).resolve() if isinstance(extracted, Path) else extracted)
        index = self.fresh("index")
        ok(self.avr("index", "build", extracted, "--out", index))
        ok(self.avr("eval", "--run", tmp_path / "run", "--device", "cpu", "--rerank-k", "1",
                    "--index", index, "--json", tmp_path / "metrics.json"))
        found = json.loads((tmp_path / "metrics.json").read_text())

        trainer.train(reference, TrainConfig(head="meanp", epochs=2, batch_size=2, device="cpu"),
                      tmp_path / "local-run")
        local_index = build_index(reference, tmp_path / "local-index")
        local = evaluate_run(tmp_path / "local-run", config=EvalConfig(
            device="cpu", rerank_k=1, index=str(local_index)))
        assert found["t2v"] == local.metrics["t2v"] and found["v2t"] == local.metrics["v2t"]
        assert found["variants"] == local.variants and "rerank@1" in local.variants

    def test_export_to_hdf5_holds_the_same_arrays(self, extracted, reference, tmp_path):
        out = self.fresh("export")
        ok(self.avr("cache", "export", extracted, f"{out}.h5"))
        fs, path = store_filesystem(f"{out}.h5")
        fs.get_file(path, str(tmp_path / "cache.h5"))
        arrays = read_store(reference)
        with h5py.File(tmp_path / "cache.h5") as h5:
            for name in ("frame_embeddings", "audio_patch_tokens", "caption_video"):
                np.testing.assert_array_equal(h5[name][:], arrays[name], err_msg=name)


def run_in_process(*args) -> subprocess.CompletedProcess:
    """The `avr` command line run in this process (for stores that live in it, ``memory://``),
    its exit status and output returned as ``run_avr`` returns them."""
    from avr.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
    return subprocess.CompletedProcess(["avr", *map(str, args)], code, out.getvalue(),
                                       err.getvalue())
