"""`avr train` from the command line (`avr sweep`: tests/test_sweep.py)."""

from __future__ import annotations

import json

import pytest

from avr.cli import main
from support.stores import make_learnable_store


def run_cli(*args):
    with pytest.raises(SystemExit) as done:
        main([*args])
    return done.value.code


def test_train_reads_a_toml_config_and_flags_override_it(tmp_path, tiny_spec):
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    config = tmp_path / "run.toml"
    config.write_text('head = "meanp"\nepochs = 3\nbatch_size = 16\nlr = 0.003\n'
                      '[head_options]\nproj = true\n')
    run = tmp_path / "run"
    main(["train", "--cache", str(store), "--config", str(config), "--epochs", "2",
          "--run-dir", str(run)])
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["batch_size"] == 16
    assert saved["head_options"]["proj"] is True
    assert len((run / "log.csv").read_text().splitlines()) == 3


def test_train_resume_continues_a_run(tmp_path, tiny_spec):
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    run = tmp_path / "run"
    main(["train", "--cache", str(store), "--head", "meanp", "--epochs", "1", "--batch-size", "16",
          "--run-dir", str(run)])
    main(["train", "--resume", str(run), "--epochs", "3"])
    assert len((run / "log.csv").read_text().splitlines()) == 4


def test_train_resume_applies_what_it_can_and_refuses_what_changes_the_run(tmp_path, tiny_spec):
    from support.console import assert_one_line_error, run_avr

    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    run = tmp_path / "run"
    main(["train", "--cache", str(store), "--head", "meanp", "--epochs", "1", "--batch-size", "16",
          "--lr", "2e-3", "--run-dir", str(run)])
    refused = run_avr("train", "--resume", run, "--epochs", "3", "--lr", "0.1", "--opt",
                      "proj=false")
    assert_one_line_error(refused, "--lr", "--opt proj", "start a new run")
    assert len((run / "log.csv").read_text().splitlines()) == 2  # nothing trained
    done = run_avr("train", "--resume", run, "--epochs", "2", "--early-stop", "5", "--opt",
                   "score_chunk=3")
    assert done.returncode == 0, done.stderr
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["epochs"], saved["early_stop"], saved["score_chunk"]) == (2, 5, 3)
    assert saved["lr"] == pytest.approx(2e-3) and saved["batch_size"] == 16
    assert len((run / "log.csv").read_text().splitlines()) == 3


def test_train_reports_a_missing_cache_without_a_traceback(tmp_path, capsys):
    assert run_cli("train", "--cache", str(tmp_path / "nowhere"), "--head", "meanp") == 2
    assert "no avr cache here" in capsys.readouterr().err
