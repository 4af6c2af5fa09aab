"""`avr sweep` on Optuna studies: search spaces, samplers, pruning, persistence, many workers."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from avr.errors import AvrError
from avr.fuse import sweep as sweeps
from avr.fuse.config import Axis, grid_points, parse_options, parse_search_space
from avr.fuse.trainer import TrainConfig
from support.console import assert_one_line_error, ok, run_module as run_avr
from support.paths import REPO
from support.stores import make_learnable_store

TINY = ["--head", "meanp", "--batch-size", "16"]


@pytest.fixture
def store(tmp_path, tiny_spec) -> Path:
    return make_learnable_store(tmp_path / "cache", tiny_spec)


def read_trials(tmp_path: Path, name: str) -> list[dict[str, str]]:
    with (tmp_path / "runs" / "sweeps" / name / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def load_study(tmp_path: Path, name: str) -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'runs' / 'sweeps' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url)


# ---- search spaces ---------------------------------------------------------------------------

def test_search_space_takes_lists_and_ranges():
    axes = parse_search_space("lr=1e-5:1e-3:log temperature=0.02:0.1 fusion=add,concat "
                              "epochs=2:8:2 device=cuda:0")
    assert axes == [Axis("lr", low=1e-5, high=1e-3, log=True),
                    Axis("temperature", low=0.02, high=0.1),
                    Axis("fusion", ("add", "concat")), Axis("epochs", low=2, high=8, step=2),
                    Axis("device", ("cuda:0",))]


def test_grid_is_the_cartesian_product_of_lists_and_refuses_ranges():
    axes = parse_search_space("lr=1e-4,3e-4 temperature=0.05,0.1 pairs=one")
    assert grid_points(axes)[1] == {"lr": 1e-4, "temperature": 0.1, "pairs": "one"}
    assert len(grid_points(axes)) == 4
    assert parse_options(["proj=false", "epochs=3"]) == {"proj": False, "epochs": 3}
    with pytest.raises(AvrError, match="use --search random or tpe"):
        grid_points(parse_search_space("lr=1e-5:1e-3:log"))


@pytest.mark.parametrize("grid, expected", [
    ("lr=1e-3:1e-2:log:5", "is not a range"),
    ("lr=1e-2:1e-3", "low must be below high"),
    ("lr=0:1e-3:log", "a log range needs low > 0"),
    ("lr", "is not of the form"),
    ("lr=1e-3 lr=1e-4", "lr is given twice"),
])
def test_malformed_search_spaces_are_refused(grid, expected):
    with pytest.raises(AvrError, match=expected):
        parse_search_space(grid)


@pytest.mark.parametrize("grid, expected", [
    ("epochs=1.5:3", "--grid: epochs = 1.5 must be a whole number"),
    ("proj=true,1", "--grid: proj = 1 must be true or false"),
    ("pairs=1:3", "pairs = 1 must be text"),
    ("nonsense=1,2", "unknown option 'nonsense'"),
    ("head=meanp,nohead", "nohead"),
])
def test_searched_options_are_typed_as_the_option_they_set(grid, expected):
    with pytest.raises(AvrError, match=expected):
        sweeps.checked_axes(TrainConfig(head="meanp"), parse_search_space(grid))


def test_a_head_option_is_searchable_when_one_of_the_searched_heads_has_it():
    axes = sweeps.checked_axes(TrainConfig(head="meanp"),
                               parse_search_space("fusion=add,concat head=xpool,tefal"))
    assert [axis.name for axis in axes] == ["head", "fusion"]
    base = TrainConfig(head="tefal")
    assert sweeps.trial_config(base, {"head": "xpool", "fusion": "concat"}).head_options == {}
    assert sweeps.trial_config(base, {"head": "tefal", "fusion": "concat"}).head_options == {
        "fusion": "concat"}


# ---- the command -----------------------------------------------------------------------------

def test_grid_sweep_writes_ranked_table_trials_csv_plots_and_complete_best_run(store, tmp_path):
    done = run_avr("sweep", "--cache", store, *TINY, "--epochs", "2", "--name", "g",
                   "--grid", "lr=1e-5,3e-3 proj=true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "val R@1" in done.stdout
    assert done.stdout.index("lr=0.003") < done.stdout.index("lr=1e-05")  # ranked, best first
    rows = read_trials(tmp_path, "g")
    assert list(rows[0]) == ["trial", "state", "epochs", "best_val_r1", "seconds", "lr", "proj"]
    assert {(r["state"], r["epochs"], float(r["lr"])) for r in rows} == {
        ("complete", "2", 1e-5), ("complete", "2", 3e-3)}
    out = tmp_path / "runs" / "sweeps" / "g"
    assert (out / "val_r1.png").stat().st_size
    assert not (out / "importances.png").exists()  # two trials say nothing about importance
    best = max(rows, key=lambda r: float(r["best_val_r1"]))
    best_run = out / f"trial-{int(best['trial']):04d}"
    assert (best_run / "best.safetensors").exists() and (best_run / "config.json").exists()
    evaluated = run_avr("eval", "--run", best_run, "--cache", store, "--split", "val",
                        cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "R@1" in evaluated.stdout


def test_tpe_draws_trials_within_the_ranges(store, tmp_path):
    done = run_avr("sweep", "--cache", store, *TINY, "--epochs", "1", "--name", "t",
                   "--search", "tpe", "--trials", "4",
                   "--grid", "lr=1e-4:1e-2:log temperature=0.02:0.1 proj=true,false",
                   "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_trials(tmp_path, "t")
    assert len(rows) == 4 and {r["state"] for r in rows} == {"complete"}
    printed = json.loads(done.stdout)  # --json: the ranked trials alone on stdout
    assert sorted(t["number"] for t in printed["trials"]) == [int(r["trial"]) for r in rows]
    ranked = [t["best_val_r1"] for t in printed["trials"]]
    assert ranked == sorted(ranked, reverse=True)  # best first
    assert printed["best"] == printed["trials"][0]["number"]
    assert all(1e-4 <= float(r["lr"]) <= 1e-2 and 0.02 <= float(r["temperature"]) <= 0.1
               for r in rows)
    saved = json.loads((tmp_path / "runs" / "sweeps" / "t" / "trial-0002" /
                        "config.json").read_text())
    assert saved["train"]["lr"] == pytest.approx(float(rows[2]["lr"]))
    assert saved["head_options"]["temperature"] == pytest.approx(float(rows[2]["temperature"]))


def test_a_searched_head_trains_each_head_with_its_own_options(store, tmp_path):
    done = run_avr("sweep", "--cache", store, "--batch-size", "16", "--epochs", "1",
                   "--name", "h", "--grid", "head=meanp,xpool proj=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    heads = {}
    for run in sorted((tmp_path / "runs" / "sweeps" / "h").glob("trial-*")):
        saved = json.loads((run / "config.json").read_text())
        heads[saved["head"]] = saved["head_options"]
    assert set(heads) == {"meanp", "xpool"}
    assert heads["meanp"]["proj"] is False and "proj" not in heads["xpool"]


def test_prune_stops_trials_and_keeps_their_logs(store, tmp_path):
    done = run_avr("sweep", "--cache", store, *TINY, "--epochs", "6", "--name", "p",
                   "--search", "random", "--trials", "8", "--prune", "--seed", "3",
                   "--grid", "lr=1e-7:1e-2:log", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_trials(tmp_path, "p")
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert pruned and all(int(r["epochs"]) < 6 for r in pruned)
    for row in pruned:
        log = tmp_path / "runs" / "sweeps" / "p" / f"trial-{int(row['trial']):04d}" / "log.csv"
        assert len(log.read_text().splitlines()) == int(row["epochs"]) + 1
    assert any(r["state"] == "complete" and r["epochs"] == "6" for r in rows)


def test_a_drawn_configuration_that_a_trial_finished_takes_its_result_untrained(store,
                                                                                  tmp_path):
    done = run_avr("sweep", "--cache", store, *TINY, "--epochs", "2", "--name", "r",
                   "--search", "random", "--trials", "6", "--seed", "1",
                   "--grid", "lr=1e-3,3e-3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_trials(tmp_path, "r")
    assert len(rows) == 6
    trained = {r["lr"]: r for r in rows if r["epochs"] == "2"}
    assert sorted(trained) == ["0.001", "0.003"]  # each configuration trained once
    sweep_dir = tmp_path / "runs" / "sweeps" / "r"
    study = load_study(tmp_path, "r")
    for row in rows:
        if row in trained.values():
            continue
        twin = trained[row["lr"]]
        assert (row["epochs"], row["state"], row["best_val_r1"]) == ("0", twin["state"],
                                                                     twin["best_val_r1"])
        assert not (sweep_dir / f"trial-{int(row['trial']):04d}").exists()
        trial = study.trials[int(row["trial"])]
        assert trial.user_attrs["repeats"] == int(twin["trial"])
        assert trial.intermediate_values == study.trials[int(twin["trial"])].intermediate_values
    assert "0 (as trial" in done.stdout


def test_a_sigkilled_grid_sweep_resumes_with_the_points_left(store, tmp_path):
    args = ["sweep", "--cache", store, *TINY, "--epochs", "3", "--name", "k",
            "--grid", "lr=1e-4,1e-3,3e-3"]
    killed = run_avr("5", *args, cwd=tmp_path, script="kill_at_epoch.py")  # in trial 1, epoch 2
    assert killed.returncode == -9
    first = tmp_path / "runs" / "sweeps" / "k" / "trial-0000" / "log.csv"
    first_log = first.read_text()
    resumed = run_avr(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_trials(tmp_path, "k")
    assert [(r["trial"], r["state"]) for r in rows] == [
        ("0", "complete"), ("1", "failed"), ("2", "complete"), ("3", "complete")]
    complete = [float(r["lr"]) for r in rows if r["state"] == "complete"]
    assert sorted(complete) == [1e-4, 1e-3, 3e-3]  # every grid point once
    # Killed after logging epoch 2, before reporting it; epoch 1's report is written in the
    # background and may not have reached the study before the kill.
    assert rows[1]["epochs"] in ("0", "1")
    assert first.read_text() == first_log  # the finished trial was not trained again


def test_a_trial_of_a_dead_worker_is_retried_with_its_options(store, tmp_path):
    """A RUNNING trial whose process is gone is failed and queued again, same options."""
    base = TrainConfig(head="meanp", epochs=1, batch_size=16)
    plan = sweeps.SweepPlan(str(store), "lr=1e-6:1e-2:log", "random", 2, False, base)
    storage = sweeps.open_storage(sweeps.storage_url("d", None, tmp_path))
    study = sweeps.open_study("d", plan, storage)
    orphan = study.ask()
    lr = sweeps.suggest(orphan, plan)["lr"]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan.set_user_attr("worker", {**sweeps.worker_identity(), "pid": gone.pid})
    sweeps.run_worker(study, storage, plan, sweeps.SweepRuns.of(tmp_path, "d"))
    states = [(t.state.name, t.params["lr"]) for t in study.trials]
    assert states[0] == ("FAIL", lr) and states[1] == ("COMPLETE", lr)
    assert len(states) == 3 and states[2][0] == "COMPLETE"


def _open_at_once(url, barrier, results):
    barrier.wait()  # every process opens the new database at the same moment
    try:
        with sweeps.StudyLock(url, "s"):
            optuna.create_study(study_name="s", storage=sweeps.open_storage(url),
                                load_if_exists=True)
        results.put("ok")
    except Exception as error:  # noqa: BLE001 - the message is what the test reports
        results.put(repr(error))


def test_workers_started_at_once_create_the_study_once(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    url = f"sqlite:///{tmp_path / 'sweeps' / 's' / 'study.db'}"
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_open_at_once, args=(url, barrier, results))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [results.get(timeout=5) for _ in workers] == ["ok"] * 4
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["s"]


def test_two_processes_share_one_study(store, tmp_path):
    args = ["sweep", "--cache", store, *TINY, "--epochs", "12", "--name", "two",
            "--grid", "lr=1e-4,2e-4,5e-4,1e-3,2e-3,3e-3 proj=true,false"]
    workers = [run_avr(*args, cwd=tmp_path, wait=False) for _ in range(2)]  # both start it
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    rows = read_trials(tmp_path, "two")
    points = {(float(r["lr"]), r["proj"]) for r in rows if r["state"] == "complete"}
    assert len(points) == 12 and len(rows) == 12  # every point once, none twice
    trained_by = {t.user_attrs["worker"]["pid"] for t in load_study(tmp_path, "two").trials}
    assert trained_by == {worker.pid for worker in workers}


def test_joining_with_another_definition_is_refused(store, tmp_path):
    args = ["sweep", "--cache", store, *TINY, "--epochs", "1", "--name", "j"]
    assert run_avr(*args, "--grid", "lr=1e-3", cwd=tmp_path).returncode == 0
    done = run_avr(*args, "--grid", "lr=1e-4", cwd=tmp_path)
    assert done.returncode == 2 and "exists with another definition" in done.stderr
    assert "grid: 'lr=1e-3' there, 'lr=1e-4' here" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = run_avr("sweep", "--name", "nothing", cwd=tmp_path)
    assert done.returncode == 2 and "no sweep named 'nothing'" in done.stderr


# ---- failures: one line each, nothing finished lost ------------------------------------------

def test_a_sweep_whose_every_trial_fails_exits_2_printing_each_reason(store, tmp_path):
    sweep_dir = tmp_path / "runs" / "sweeps" / "f"
    for number in (0, 1):  # runs left by an earlier study of this name: each trial refuses
        (sweep_dir / f"trial-{number:04d}").mkdir(parents=True)
        (sweep_dir / f"trial-{number:04d}" / "config.json").write_text("{}")
        (sweep_dir / f"trial-{number:04d}" / "last.safetensors").write_bytes(b"")
    done = run_avr("sweep", "--cache", store, *TINY, "--epochs", "1", "--name", "f",
                   "--grid", "lr=1e-3,3e-3", cwd=tmp_path)
    assert_one_line_error(done, "sweep 'f': every trial failed (2)", "already holds a run")
    for number in (0, 1):
        assert f"trial {number} failed: {sweep_dir / f'trial-{number:04d}'} already holds a run" \
            in " ".join(done.stdout.split())
    assert [row["state"] for row in read_trials(tmp_path, "f")] == ["failed", "failed"]


def test_failed_trials_rank_last_whatever_they_reported():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    failed = study.ask()
    failed.report(90.0, 1)  # reported well, then failed
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    for value in (10.0, 20.0):
        trial = study.ask()
        trial.report(value, 1)
        study.tell(trial, value)
    rows = sweeps.finished_rows(study)
    assert [(row.number, row.state) for row in rows] == [(2, "complete"), (1, "complete"),
                                                         (0, "failed")]
    assert rows[-1].error == sweeps.results.LOST_WORKER


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///", "names no database file"),
    ("sqlite://", "names no database file"),
    ("sqlite:///:memory:", "names no database file"),
    ("sqlite:///{tmp}", "is a folder; name a file in it"),
    ("sqlite:///{tmp}/notes.db", "a damaged database, or not one (file is not a database)"),
    ("sqlite:x", "names no database file"),
])
def test_a_storage_url_that_names_no_usable_sqlite_file_is_one_line(tmp_path, url, expected):
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    url = url.format(tmp=tmp_path)
    done = run_avr("sweep", "--name", "s", "--storage", url, "--grid", "lr=1e-3", cwd=tmp_path)
    assert_one_line_error(done, f"--storage {url}", expected)


def test_a_damaged_study_db_is_named_as_damaged(store, tmp_path):
    ok(run_avr("sweep", "--cache", store, *TINY, "--epochs", "1", "--name", "d",
               "--grid", "lr=1e-3", cwd=tmp_path))
    study_db = tmp_path / "runs" / "sweeps" / "d" / "study.db"
    with study_db.open("r+b") as handle:
        handle.seek(4096)  # the second page: the schema's tables
        handle.write(bytes(range(256)) * 16)
    done = run_avr("sweep", "--name", "d", cwd=tmp_path)
    assert_one_line_error(done, f"sqlite:///{study_db}", "a damaged database",
                          "database disk image is malformed", "another --name")


def test_a_full_disk_stops_the_sweep_with_one_line_and_the_same_command_resumes(store,
                                                                               tmp_path):
    from support.disks import small_disk

    args = ["sweep", "--cache", store, *TINY, "--epochs", "2", "--name", "full",
            "--grid", "lr=1e-4,1e-3,3e-3"]
    with small_disk(tmp_path / "disk", 4) as disk:
        # the disk fills after trial 0's first epoch of trial 1 (3rd epoch logged)
        full = run_avr("3", disk, *args, cwd=disk, script="fill_at_epoch.py")
        # what meets the full disk first, a trial's files or the study's database, names it
        assert_one_line_error(full, "run the same command again")
        assert "no space left on device" in full.stderr or "disk is full" in full.stderr
        (disk / "filler").unlink()
        resumed = run_avr(*args, cwd=disk)
        assert resumed.returncode == 0, resumed.stderr
        rows = read_trials(disk, "full")
    assert sorted(float(r["lr"]) for r in rows if r["state"] == "complete") == [1e-4, 1e-3,
                                                                                 3e-3]
    assert [r["trial"] for r in rows if r["state"] == "failed"] == ["1"]  # retried as trial 2


def test_the_study_lock_gives_up_after_the_study_timeout_naming_its_holder(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom avr.fuse.sweep import StudyLock\n"
         "with StudyLock(sys.argv[1], 'held'):\n    print('held', flush=True)\n"
         "    time.sleep(120)\n", url], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        done = run_avr("sweep", "--name", "held", "--storage", url, "--grid", "lr=1e-3",
                       "--study-timeout", "2", cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(done, "sweep 'held'", "locked for 2 s", f"pid {holder.pid} on host "
                          f"{socket.gethostname()}", "command: -c", "--study-timeout")


def test_eval_of_a_trial_whose_weights_the_sweep_dropped_names_save_runs(store, tmp_path):
    ok(run_avr("sweep", "--cache", store, *TINY, "--epochs", "1", "--name", "w",
               "--grid", "lr=1e-5,3e-3", cwd=tmp_path))
    trials = (tmp_path / "runs" / "sweeps" / "w").glob("trial-*")
    run, = [trial for trial in trials if not (trial / "best.safetensors").exists()]
    done = run_avr("eval", "--run", run, "--cache", store, cwd=tmp_path)
    assert_one_line_error(done, f"{run / 'best.safetensors'} not found", "sweep 'w' kept the "
                          "weights of only its best trial's", "--save-runs")


# ---- installs --------------------------------------------------------------------------------

def test_sweep_without_optuna_names_the_extra_to_install(store, tmp_path):
    done = run_avr("optuna", "sweep", "--cache", store, *TINY, "--grid", "lr=1e-3",
                   cwd=tmp_path, script="without_module.py")
    assert_one_line_error(done, "avr sweep needs optuna", "pip install 'avr[sweep]'")


def test_the_sweep_package_imports_without_optuna():
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['optuna'] = None\n"
                           "import avr.fuse.sweep, avr.cli"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


# ---- what the study records and the plots show ----------------------------------------------

def test_a_grid_study_records_listed_numbers_as_numeric_distributions_named_val_r1(store,
                                                                                  tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    base = TrainConfig(head="meanp", epochs=1, batch_size=16)
    plan = sweeps.SweepPlan(str(store), "lr=1e-4,1e-3 dropout=0.0,0.3 proj=true,false", "grid",
                            None, False, base)
    storage = sweeps.open_storage(sweeps.storage_url("n", None, tmp_path))
    study = sweeps.open_study("n", plan, storage)
    asked = sweeps.take_trials(study, plan, 8, sweeps.worker.Heartbeat(storage),
                               sweeps.worker_identity(), True)
    assert len({tuple(sorted(options.items())) for _, options in asked}) == 8
    distributions = asked[0][0].distributions
    assert distributions["lr"] == FloatDistribution(1e-4, 1e-3, log=True)
    assert distributions["dropout"] == FloatDistribution(0.0, 0.3)
    assert distributions["proj"] == CategoricalDistribution([True, False])
    assert study.metric_names == ["val R@1"]


def _row(number: int, state: str, curve: list[float]) -> sweeps.TrialRow:
    return sweeps.TrialRow(number, state, len(curve), max(curve), 1.0, {"lr": 1e-3 * number},
                           None, None, curve, None)


def test_the_curves_plot_has_a_legend_and_says_x_is_pruned_only_when_a_trial_was():
    import matplotlib

    matplotlib.use("Agg")
    complete = [_row(0, "complete", [10.0, 20.0]), _row(1, "complete", [5.0, 8.0])]
    figure = sweeps.results.curves_figure("s", complete)
    axes = figure.axes[0]
    assert axes.get_title() == "s: 2 trials" and axes.get_ylabel() == "val R@1 (%)"
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["0: lr=0", "1: lr=0.001"]
    pruned = sweeps.results.curves_figure("s", [*complete, _row(2, "pruned", [1.0])])
    assert pruned.axes[0].get_title() == "s: 3 trials (x: pruned)"


@pytest.mark.parametrize("complete, drawn", [(7, False), (8, True)])
def test_importances_are_drawn_from_eight_complete_trials(tmp_path, complete, drawn):
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for number in range(complete):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 1e-4 * (number + 1), "dropout": 0.1 * (number % 3)},
            distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True),
                           "dropout": FloatDistribution(0.0, 0.5)},
            value=float(number), intermediate_values={1: float(number)}))
    paths = sweeps.write_plots(study, tmp_path)
    assert (tmp_path / "importances.png" in paths) == drawn
    assert (tmp_path / "importances.png").exists() == drawn
