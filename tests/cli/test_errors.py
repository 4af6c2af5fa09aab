"""Usage errors and bad inputs as a user meets them: typer's short usage message or one
`error:` line, exit status 2, never a traceback, and nothing drawn (no progress bar) before the
problem is known. The first tests run the installed `avr` console script; the option checks of
every command then run in this process through typer's test runner (same parsing, no start-up
cost per case)."""

from __future__ import annotations


import pytest
from typer.testing import CliRunner

from avr.cli import app
from support.console import assert_one_line_error, assert_usage_error, run_avr
from support.stores import make_learnable_store

@pytest.mark.parametrize("args, expected", [
    (["train", "--bogus"], "No such option: --bogus"),
    (["train", "--lr", "abc"], "Invalid value for '--lr'"),
    (["train", "--epochs", "-1"], "Invalid value for '--epochs'"),
    (["cache", "export", "--format"], "Option '--format' requires an argument"),
    (["train", "--lr"], "Option '--lr' requires an argument"),
])
def test_a_usage_error_of_the_console_script_prints_the_short_usage_and_exits_2(args, expected):
    assert_usage_error(run_avr(*args), expected)


@pytest.mark.parametrize("args, expected", [
    (["train", "--batch-size", "1"], "Invalid value for '--batch-size'"),
    (["train", "--lr", "0"], "Invalid value for '--lr': 0.0 must be > 0"),
    (["train", "--head", "clip4clip"], "unknown head 'clip4clip'; available: avigate"),
    (["train", "--pairs", "some"], "'some' is not one of one, all"),
    (["train", "--device", "gpu"], "device 'gpu' is not known"),
    (["sweep", "--grid", "lr=1e-3", "--epochs", "0"], "Invalid value for '--epochs'"),
    (["eval", "--split", "dev"], "'dev' is not one of test, val"),
    (["eval", "--rerank-k", "0"], "Invalid value for '--rerank-k'"),
    (["search"], "give a QUERY or --queries FILE"),
    (["search", "a dog", "--k", "0"], "Invalid value for '-k' / '--top-k' / '--k'"),
    (["cache", "export", "cache", "out.zip", "--format", "zip"], "'zip' is not one of h5"),
    (["index", "build", "--kind", "lsh"], "'lsh' is not one of auto, flat, ivf, hnsw"),
    (["extract", "--dataset", "kinetics"], "unknown dataset 'kinetics'"),
    (["extract", "--backbones", "huge"], "'huge' is not one of real, tiny"),
    (["extract", "--frames", "0"], "Invalid value for '--frames'"),
    (["demo", "--budget", "-5"], "Invalid value for '--budget'"),
    (["bench", "inference"], "No such command 'inference'"),
    (["bench", "train", "--scale", "0"], "Invalid value for '--scale'"),
])
def test_every_command_checks_its_options_before_any_work(args, expected):
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert expected in result.stderr and result.stdout == ""


def test_a_missing_store_is_one_line_naming_it(tmp_path):
    assert_one_line_error(run_avr("cache", "info", tmp_path / "nowhere"),
                          f"{tmp_path / 'nowhere'}: no avr cache here")


def test_a_head_option_is_checked_by_the_heads_own_config_before_anything_is_drawn(tmp_path,
                                                                                  tiny_spec):
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    done = run_avr("train", "--cache", store, "--fusion", "sum")
    assert_one_line_error(done, "tefal: unknown fusion 'sum'; choose one of add, late, "
                                "score_sum, concat, xattn, stack")
    assert done.stdout == ""


def test_toml_values_are_checked_before_anything_is_drawn(tmp_path, tiny_spec):
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    config = tmp_path / "run.toml"
    config.write_text('head = "meanp"\nepochs = "five"\n')
    done = run_avr("train", "--cache", store, "--config", config)
    assert_one_line_error(done, f"{config}: epochs = 'five' must be a whole number")
    assert done.stdout == ""


def run_main(capsys, *args) -> tuple[int, str, str]:
    """``avr.cli.main`` in this process: (exit status, stdout, stderr)."""
    from avr.cli import main

    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_a_config_out_of_range_fails_before_the_progress_bar(tmp_path, tiny_spec, capsys):
    store = make_learnable_store(tmp_path / "cache", tiny_spec)
    config = tmp_path / "run.toml"
    config.write_text('head = "meanp"\nwarmup = 2.0\n')
    code, out, err = run_main(capsys, "train", "--cache", store, "--config", config)
    assert code == 2 and out == ""
    assert "warmup is a fraction of all steps, in [0, 1], not 2.0" in err


@pytest.mark.parametrize("content, expected", [
    (b'head = "meanp"\nepochs = \n', "not valid TOML"),
    (b'head = "meanp"\n# caf\xe9\n', ":2: not UTF-8"),
    (b'head = "meanp"\nbatch = 16\n', "unknown training option(s) batch"),
    (b'head = "meanp"\n[head_options]\nproj = "yes"\n', "[head_options]: proj = 'yes' must be "
                                                       "true or false"),
    (b'head_options = 3\n', "head_options must be a table"),
    (b'cache = 7\n', "cache = 7 must be text"),
])
def test_a_bad_run_toml_is_one_line_naming_the_file(tmp_path, capsys, content, expected):
    config = tmp_path / "run.toml"
    config.write_bytes(content)
    code, out, err = run_main(capsys, "train", "--config", config, "--cache", tmp_path / "cache")
    assert code == 2 and out == ""
    assert str(config) in err and expected in " ".join(err.split())


@pytest.mark.parametrize("args, expected", [
    (["train", "--opt", "epochs=five"], "--opt: epochs = 'five' must be a whole number"),
    (["train", "--head", "meanp", "--opt", "proj=1"], "--opt: proj = 1 must be true or false"),
    (["sweep", "--head", "meanp", "--grid", "lr=1e-3,fast"], "--grid: lr = 'fast' must be a "
                                                            "number"),
    (["sweep", "--head", "meanp", "--grid", "warmup=0.1,3"], "warmup is a fraction"),
    (["train", "--option", "epochs=five"], "--opt: epochs = 'five' must be a whole number"),
    (["sweep", "--head", "meanp", "--grid", "lr=1e-3", "--option", "proj=1"],
     "--opt: proj = 1 must be true or false"),
    (["train", "--head", "htav", "--opt", "spans=1+x"], "--opt: spans = '1+x' must be whole "
                                                        "numbers separated by + or ,"),
])
def test_opt_and_grid_values_are_checked_before_any_work(capsys, args, expected):
    code, out, err = run_main(capsys, *args)
    assert code == 2 and out == "" and expected in " ".join(err.split())


def test_debug_raises_the_error_itself(tmp_path):
    from avr.cli import main
    from avr.errors import CacheMismatchError

    with pytest.raises(CacheMismatchError):
        main(["--debug", "cache", "info", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("command", [["train", "--head", "meanp"],
                                     ["sweep", "--head", "meanp", "--grid", "lr=1e-3"]])
def test_a_missing_store_is_reported_before_anything_is_drawn(tmp_path, capsys, command):
    code, out, err = run_main(capsys, *command, "--cache", tmp_path / "nowhere")
    assert code == 2 and out == ""
    assert f"{tmp_path / 'nowhere'}: no avr cache here" in " ".join(err.split())
