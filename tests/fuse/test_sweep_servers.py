"""`avr sweep` past one machine, against the real parts: a PostgreSQL server holds the study,
moto's S3 server the trials' folders; every worker is a process of its own in a working folder
of its own (no shared local disk), as on machines of their own."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest

from avr.fuse import sweep as sweeps
from support.console import assert_one_line_error, ok, run_module as run_avr
from support.servers import (PostgresServer, new_database, postgres_server,  # noqa: F401
                             postgres_url, s3_server)
from support.stores import make_learnable_store

TINY = ["--head", "meanp", "--batch-size", "16"]
GRID_12 = "lr=1e-4,3e-4,1e-3,3e-3 temperature=0.05,0.1,0.2"


@pytest.fixture
def store(tmp_path, tiny_spec) -> Path:
    return make_learnable_store(tmp_path / "cache", tiny_spec)


def start_worker(folder: Path, *args, script: str | None = None):
    """A worker in a working folder of its own, as on a machine of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    return run_avr(*args, cwd=folder, wait=False, script=script)


def finish(worker, timeout: float = 600) -> subprocess.CompletedProcess:
    out, err = worker.communicate(timeout=timeout)
    return subprocess.CompletedProcess(worker.args, worker.returncode, out, err)


def load(name: str, url: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=sweeps.database_url(url))


@pytest.mark.timeout(1800)  # 20 worker processes; minutes on a busy machine
def test_four_workers_on_one_postgres_study_train_every_grid_point_exactly_once(
        store, postgres_url, tmp_path):
    for run in range(5):
        name = f"grid-{run}"
        args = ["sweep", "--cache", store, *TINY, "--epochs", "1", "--name", name,
                "--storage", postgres_url, "--grid", GRID_12]
        workers = [start_worker(tmp_path / name / f"machine-{k}", *args) for k in range(4)]
        for worker in workers:
            ok(finish(worker))
        trials = load(name, postgres_url).trials
        points = {tuple(sorted(t.params.items())) for t in trials}
        assert [t.state.name for t in trials] == ["COMPLETE"] * 12 and len(points) == 12
        assert len({t.user_attrs["worker"]["pid"] for t in trials}) > 1  # shared out


def test_a_worker_that_joins_a_finished_sweep_late_trains_nothing_and_shows_it(
        store, postgres_url, tmp_path):
    args = ["--cache", store, *TINY, "--epochs", "1", "--name", "late", "--storage",
            postgres_url]
    ok(run_avr("sweep", *args, "--grid", "lr=1e-3,3e-3", cwd=tmp_path))
    (tmp_path / "late-machine").mkdir()
    late = ok(run_avr("sweep", "--name", "late", "--storage", postgres_url,
                      cwd=tmp_path / "late-machine"))
    assert len(load("late", postgres_url).trials) == 2
    assert "complete" in late.stdout and "best: trial" in late.stdout


def test_a_trial_of_a_lost_machine_is_trained_again_by_another_worker(store, postgres_url,
                                                                      tmp_path):
    args = ["sweep", "--cache", store, *TINY, "--epochs", "3", "--name", "lost",
            "--storage", postgres_url, "--heartbeat", "1", "--grid", "lr=1e-4,1e-3,3e-3"]
    lost = start_worker(tmp_path / "lost-machine", "2", *args, script="lost_machine.py")
    survivor = start_worker(tmp_path / "machine", *args)
    assert finish(lost).returncode == -9  # killed in its first trial, after epoch 2
    ok(finish(survivor))
    trials = load("lost", postgres_url).trials
    failed, = [t for t in trials if t.state.name == "FAIL"]
    assert failed.user_attrs["worker"]["machine"] == "a machine that is not this one"
    retried = [t for t in trials if failed.number in t.system_attrs.get("retry_history", [])]
    assert [(t.state.name, t.params) for t in retried] == [("COMPLETE", failed.params)]
    complete = sorted(t.params["lr"] for t in trials if t.state.name == "COMPLETE")
    assert complete == [1e-4, 1e-3, 3e-3]


def test_tpe_with_pruning_over_three_workers_draws_each_trial_once(store, postgres_url,
                                                                     tmp_path):
    args = ["sweep", "--cache", store, *TINY, "--epochs", "6", "--name", "tpe",
            "--storage", postgres_url, "--search", "tpe", "--trials", "9", "--prune",
            "--seed", "3", "--grid", "lr=1e-7:1e-2:log"]
    workers = [start_worker(tmp_path / f"machine-{k}", *args) for k in range(3)]
    for worker in workers:
        ok(finish(worker))
    trials = load("tpe", postgres_url).trials
    assert len(trials) == 9 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    trained = [t for t in trials if "repeats" not in t.user_attrs]
    assert len({t.params["lr"] for t in trained}) == len(trained)  # no draw handed out twice
    assert all(1e-7 <= t.params["lr"] <= 1e-2 for t in trials)
    assert any(t.state.name == "PRUNED" for t in trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) > 1


def test_a_database_server_that_goes_away_is_waited_for_and_else_named_in_one_line(store,
                                                                                  tmp_path):
    server = PostgresServer().start()
    try:
        url = new_database(server.url)
        args = ["sweep", "--cache", store, *TINY, "--epochs", "3", "--storage", url,
                "--grid", "lr=1e-4,1e-3,3e-3"]
        # away for 3 s in the middle of trial 1, the worker waiting up to 60 s: it goes on
        pause = tmp_path / "short.paused"
        worker = start_worker(tmp_path / "short", "5", pause, *args, "--name", "short",
                              "--study-timeout", "60", script="pause_at_epoch.py")
        wait_for(pause)
        server.stop()
        pause.unlink()  # the worker's next calls meet no server
        time.sleep(3)
        server.start()
        ok(finish(worker))
        assert [t.state.name for t in load("short", url).trials] == ["COMPLETE"] * 3
        # away for longer than the worker waits: one line, then the same command resumes
        pause = tmp_path / "long.paused"
        worker = start_worker(tmp_path / "long", "5", pause, *args, "--name", "long",
                              "--study-timeout", "3", script="pause_at_epoch.py")
        wait_for(pause)
        server.stop()
        pause.unlink()
        gone = finish(worker)
        server.start()
        assert_one_line_error(gone, f"--storage {url}", "run the same command again to resume")
        ok(finish(start_worker(tmp_path / "long", *args, "--name", "long")))
        trials = load("long", url).trials
        complete = sorted(t.params["lr"] for t in trials if t.state.name == "COMPLETE")
        assert complete == [1e-4, 1e-3, 3e-3]
        assert [t.number for t in trials if t.state.name == "FAIL"] == [1]  # retried
    finally:
        server.remove()


def test_trials_on_s3_are_found_by_eval_whichever_machine_trained_them(
        store, postgres_url, s3_server, tmp_path):
    runs_dir = f"s3://avr-test/sweeps-{uuid.uuid4().hex[:8]}"
    args = ["sweep", "--cache", store, *TINY, "--epochs", "1", "--name", "s3",
            "--storage", postgres_url, "--runs-dir", runs_dir, "--grid", "lr=1e-5,1e-3,3e-3"]
    workers = [start_worker(tmp_path / f"machine-{k}", *args) for k in range(2)]
    for worker in workers:
        ok(finish(worker))
    trials = load("s3", postgres_url).trials
    assert {t.user_attrs["run_dir"] for t in trials} == {
        f"{runs_dir}/s3/trial-{t.number:04d}" for t in trials}
    assert not list(tmp_path.glob("machine-*/runs/sweeps/s3/trial-*"))  # moved to S3
    best = max(trials, key=lambda t: t.value)
    (tmp_path / "reader").mkdir()
    evaluated = ok(run_avr("eval", "--run", best.user_attrs["run_dir"], "--cache", store,
                           cwd=tmp_path / "reader"))
    assert "R@1" in evaluated.stdout
    other = next(t for t in trials if t.number != best.number)
    done = run_avr("eval", "--run", other.user_attrs["run_dir"], "--cache", store,
                   cwd=tmp_path / "reader")
    assert_one_line_error(done, "best.safetensors not found", "--save-runs")
    import fsspec

    s3 = fsspec.filesystem("s3", skip_instance_cache=True)
    assert s3.cat(f"{runs_dir}/s3/trials.csv").decode().startswith("trial,state")


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)
