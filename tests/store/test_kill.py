"""`avr extract` as real processes: two runs racing on one new store, and runs SIGKILLed at
chosen writes (an overwrite, store creation and its commit, caption and video chunks) and
resumed by a plain rerun that ends with the same store as an uninterrupted run. Kills after a
delay are in test_extract.py and test_extract_dask.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avr.errors import CacheMismatchError
from avr.extract.demo_data import generate_demo
from avr.extract.pipeline import extract
from avr.store import schema
from avr.store.group import open_store, store_condition
from support.store_checks import assert_same_store, avr_env, demo_extract_config
from support.paths import SUPPORT

CHUNK = 2
KILLER = SUPPORT / "kill_at_write.py"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, num_looks=1)


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "cache"
    extract(demo_extract_config(demo_root, out, CHUNK))
    return out


def extract_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--dataset", "demo", "--root", str(root), "--out", str(out),
            "--backbones", "tiny", "--workers", "0", "--chunk-rows", str(CHUNK), "--device",
            "cpu", *extra]



def run_avr(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avr", *args], capture_output=True,
                          text=True, env=avr_env())


def run_killed_at(key: str, nth: int, when: str, args: list[str]) -> int:
    return subprocess.run([sys.executable, str(KILLER), key, str(nth), when, *args],
                          capture_output=True, env=avr_env()).returncode


# Moments of a run, in the order runs reach them: each killed run resumes what the one before
# left, so every point is reached by the run that is killed there. The first run replaces a
# store made with other settings (--overwrite).
KILL_POINTS = [
    ("frame_embeddings/zarr.json", 1, "after"),  # overwriting: old store gone, new half made
    ("zarr.json", 2, "before"),  # creating: everything written but the commit
    ("caption_done/c/0", 1, "before"),  # caption features written, not marked done
    ("frame_embeddings/c/1/0/0", 1, "after"),  # a video chunk half written
]


@pytest.mark.slow
def test_a_run_killed_at_any_moment_resumes_to_the_same_store(demo_root, reference,
                                                              tmp_path):
    out = tmp_path / "cache"
    extract(demo_extract_config(demo_root, out, CHUNK, num_frames=4))
    args = extract_args(demo_root, out)
    for run, (key, nth, when) in enumerate(KILL_POINTS):
        code = run_killed_at(key, nth, when, [*args, *(["--overwrite"] if run == 0 else [])])
        assert code == -9, f"the run killed at {when} write {nth} of {key} exited {code}"
    rerun = run_avr(args)
    assert rerun.returncode == 0, rerun.stderr
    assert "took over the lock" in rerun.stdout
    assert_same_store(reference, out)
    assert not (out / schema.LOCK_FILE).exists()


def test_two_runs_racing_on_a_new_store_leave_one_writer(demo_root, reference, tmp_path):
    out = tmp_path / "cache"
    racers = [subprocess.Popen([sys.executable, "-m", "avr", *extract_args(demo_root, out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=avr_env()) for _ in range(2)]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    codes = [racer.returncode for racer in racers]
    assert sorted(codes) == [0, 2], outputs
    refusal = outputs[codes.index(2)][1]
    assert "is locked by another avr process: pid" in " ".join(refusal.split())
    assert "Traceback" not in refusal
    assert_same_store(reference, out)


# ---- what a rerun finds -------------------------------------------------------------------------

def test_a_store_is_complete_only_once_its_root_attributes_are_written(reference, tmp_path):
    out = Path(shutil.copytree(reference, tmp_path / "cache"))
    assert store_condition(out) == "complete"
    (out / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    assert store_condition(out) == "unfinished"  # as creation leaves it before the commit
    with pytest.raises(CacheMismatchError, match="creation did not finish"):
        open_store(out)


def test_an_overwrite_killed_midway_leaves_an_unfinished_store(reference, tmp_path):
    out = Path(shutil.copytree(reference, tmp_path / "cache"))
    (out / schema.INDEX_DIR).mkdir()  # `avr index build` wrote into the store
    (out / "zarr.json").unlink()  # clear_store deletes the root metadata first
    assert store_condition(out) == "unfinished"


def test_a_folder_holding_other_files_is_not_taken_for_a_store(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / schema.LOCK_FILE).write_text("{}")
    assert store_condition(out) == "empty"
    (out / "notes.txt").write_text("mine")
    assert store_condition(out) == "foreign"
