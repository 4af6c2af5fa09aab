"""What a run folder guarantees, as a user meets it through the `avr` console script: one writer
at a time, files written whole, a run that finished no epoch replaced by the same command, the
store it trained on checked on resume, damaged files and bad values refused in one line."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.console import assert_one_line_error, ok, run_avr
from support.paths import REPO, SUPPORT
from support.stores import make_learnable_store

TRAIN = ["--head", "xpool", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from support.specs import make_tiny_spec

    return make_learnable_store(tmp_path_factory.mktemp("store") / "cache", make_tiny_spec())


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> Path:
    """A run of two epochs, copied by the tests that damage it."""
    run = tmp_path_factory.mktemp("runs") / "run"
    ok(run_avr("train", "--cache", store, *TRAIN, "--epochs", "2", "--run-dir", run))
    return run


@pytest.fixture()
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def start(*args, script: str | None = None) -> subprocess.Popen:
    command = [sys.executable, *([str(SUPPORT / script)] if script else ["-m", "avr"]),
               *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def epochs_logged(run: Path) -> list[str]:
    return [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]]


# ---- one writer ---------------------------------------------------------------------------------

def test_a_second_train_on_a_run_folder_in_use_is_refused_naming_the_holder(store, tmp_path):
    first = start("train", "--cache", store, *TRAIN, "--epochs", "400", "--run-dir",
                  tmp_path / "run")
    try:
        wait_for(tmp_path / "run" / "config.json", first)
        second = run_avr("train", "--cache", store, *TRAIN, "--head", "meanp", "--epochs", "1",
                         "--run-dir", tmp_path / "run")
        assert_one_line_error(second, "is locked by another avr process", f"pid {first.pid}")
        resumed = run_avr("train", "--resume", tmp_path / "run", "--epochs", "500")
        assert_one_line_error(resumed, "is locked by another avr process", f"pid {first.pid}")
    finally:
        first.kill()
        first.communicate()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["head"] == "xpool"  # the refused meanp run wrote nothing there


def test_a_killed_holders_lock_is_taken_over_by_the_next_resume(store, tmp_path):
    killed = start("1", "train", "--cache", store, *TRAIN, "--epochs", "3", "--run-dir",
                   tmp_path / "run", script="kill_at_epoch.py")
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "avr.lock").exists()  # left by the killed writer
    ok(run_avr("train", "--resume", tmp_path / "run"))
    assert epochs_logged(tmp_path / "run") == ["1", "2", "3"]
    assert not (tmp_path / "run" / "avr.lock").exists()


def test_eval_does_not_write_into_a_run_folder_a_train_holds(store, run):
    first = start("train", "--resume", run, "--epochs", "400")  # a copy: it trains on
    try:
        wait_for(run / "avr.lock", first)
        done = run_avr("eval", "--run", run, "--device", "cpu")
        assert done.returncode == 2 and "is locked by another avr process" in done.stderr
    finally:
        first.send_signal(signal.SIGINT)  # stops once its epoch is saved
        first.communicate(timeout=300)


# ---- a run that finished no epoch ----------------------------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_is_replaced_by_the_same_command(store,
                                                                                   tmp_path):
    args = ["train", "--cache", store, *TRAIN, "--epochs", "2", "--run-dir", tmp_path / "run"]
    killed = start("0", *args, script="kill_at_epoch.py")
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "config.json").exists()
    assert not (tmp_path / "run" / "last.safetensors").exists()
    resumed = run_avr("train", "--resume", tmp_path / "run")
    assert_one_line_error(resumed, "finished no epoch", "start it again with the same")
    again = ok(run_avr(*args))
    assert "held a run that finished no epoch: replaced" in again.stdout
    assert epochs_logged(tmp_path / "run") == ["1", "2"]


def test_a_folder_holding_a_trained_run_is_refused(store, run):
    done = run_avr("train", "--cache", store, *TRAIN, "--epochs", "1", "--run-dir", run)
    assert_one_line_error(done, "already holds a run", "--resume")


# ---- the store a run trained on ------------------------------------------------------------------

def test_resume_refuses_a_store_of_other_videos_naming_the_difference(run, tmp_path):
    from support.specs import make_tiny_spec

    other = make_learnable_store(tmp_path / "other", make_tiny_spec(), n_train=40)
    done = run_avr("train", "--resume", run, "--epochs", "3", "--cache", other)
    assert_one_line_error(done, "is not the cache this run was trained on", "content:",
                          "other videos, splits or captions")


def test_resume_from_a_moved_store_records_its_new_location(store, run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(store, moved)
    ok(run_avr("train", "--resume", run, "--epochs", "3", "--cache", moved))
    config = json.loads((run / "config.json").read_text())
    assert config["cache"]["path"] == str(moved.resolve())
    ok(run_avr("eval", "--run", run, "--device", "cpu"))  # finds the store where it now is


# ---- damaged files -------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ('{"head": "xpool", "train":', "not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    ('{"head": "xpool"}', "'head_options' is missing"),
    ('{"head": 3, "head_options": {}, "train": {}, "cache": {}}', "'head' is a int, not text"),
])
def test_a_damaged_config_json_is_one_line_for_eval_and_resume(run, content, expected):
    (run / "config.json").write_text(content)
    assert_one_line_error(run_avr("eval", "--run", run, "--device", "cpu"), expected)
    assert_one_line_error(run_avr("train", "--resume", run, "--epochs", "3"), expected)


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "not a readable safetensors file"),
    ("random", "not a readable safetensors file"),
    ("shape", "tensor head.pool.query.weight is torch.float32 [3, 3]"),
    ("int64", "tensor head.logit_scale is torch.int64"),
])
def test_damaged_weights_are_refused_naming_the_file_and_tensor(run, damage, expected):
    best = run / "best.safetensors"
    if damage == "truncate":
        best.write_bytes(best.read_bytes()[:100])
    elif damage == "random":
        best.write_bytes(os.urandom(5000))
    else:
        tensors = load_file(str(best))
        if damage == "shape":
            tensors["head.pool.query.weight"] = torch.zeros(3, 3)
        else:
            tensors["head.logit_scale"] = tensors["head.logit_scale"].long()
        save_file(tensors, str(best), metadata={"head": "xpool"})
    assert_one_line_error(run_avr("eval", "--run", run, "--device", "cpu"), str(best), expected)


def test_a_garbled_log_is_refused_naming_its_line(run):
    (run / "log.csv").write_text("epoch,loss,val_r1\nnot,a,row\n")
    assert_one_line_error(run_avr("train", "--resume", run, "--epochs", "3"),
                          "log.csv, line 2: not a row avr writes")


def test_a_full_disk_stops_training_in_one_line_and_the_run_resumes(store, tmp_path):
    run = tmp_path / "run"
    # config.json, then epoch 1's best, last and log: the disk fills during epoch 2's files
    full = subprocess.run([sys.executable, str(SUPPORT / "full_disk.py"), "3", "train",
                           "--cache", store, *TRAIN, "--epochs", "3", "--run-dir", run],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    assert_one_line_error(full, "cannot be written (No space left on device)")
    assert not list(run.glob("*.tmp"))
    ok(run_avr("train", "--resume", run))
    assert epochs_logged(run) == ["1", "2", "3"]


def test_a_stray_temporary_is_removed_on_resume(run):
    (run / "last.safetensors.tmp").write_bytes(b"half a file")
    ok(run_avr("train", "--resume", run, "--epochs", "3"))
    assert not (run / "last.safetensors.tmp").exists()


# ---- values --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "1e6"], "lr must be in (0, 1]"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--seed", "-1"], "seed must be in [0, 2**32)"),
    (["--opt", "dropout=inf"], "dropout must be a finite number"),
])
def test_bad_values_are_refused_before_anything_starts(store, tmp_path, flags, expected):
    done = run_avr("train", "--cache", store, *TRAIN, "--epochs", "1", "--run-dir",
                   tmp_path / "run", *flags)
    assert_one_line_error(done, expected)
    assert done.stdout == "" and not (tmp_path / "run").exists()


def test_a_train_split_too_small_for_one_step_is_refused(tmp_path):
    from support.specs import make_tiny_spec

    tiny = make_learnable_store(tmp_path / "tiny", make_tiny_spec(), n_train=1)
    done = run_avr("train", "--cache", tiny, *TRAIN, "--epochs", "1", "--run-dir",
                   tmp_path / "run")
    assert_one_line_error(done, "the train split has 1 extracted video", "at least 2")


def test_a_file_given_as_the_store_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a store")
    done = run_avr("train", "--cache", tmp_path / "notes.txt", "--epochs", "1")
    assert_one_line_error(done, "is a file, not a store")


# ---- Ctrl-C --------------------------------------------------------------------------------------

def test_ctrl_c_stops_once_the_epoch_is_saved_and_says_how_to_resume(store, tmp_path):
    run = tmp_path / "run"
    training = start("train", "--cache", store, *TRAIN, "--epochs", "400", "--run-dir", run)
    wait_for(run / "log.csv", training)
    training.send_signal(signal.SIGINT)
    _, err = training.communicate(timeout=300)
    assert training.returncode == 130, err
    assert f"continue with `avr train --resume {run}`" in err
    done = epochs_logged(run)
    assert 1 <= len(done) < 400 and (run / "last.safetensors").exists()
    config = json.loads((run / "config.json").read_text())
    ok(run_avr("train", "--resume", run, "--epochs", str(len(done) + 1)))
    assert epochs_logged(run) == [str(e) for e in range(1, len(done) + 2)]
    assert config["train"]["epochs"] == 400
