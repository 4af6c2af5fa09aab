"""A base install (no extra): every module imports, a head trains and evaluates, and each command
that needs an extra says in one line which `pip install 'avr[EXTRA]'` adds it."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest

import avr
from avr.errors import MissingExtraError
from avr.extras import EXTRA_OF, require
from support.console import assert_one_line_error, ok
from support.console import run_module as run_avr
from support.paths import REPO
from support.stores import make_learnable_store

# Every module an extra installs, as pyproject's [project.optional-dependencies] lists them.
EXTRAS = ("dask", "distributed", "h5py", "pyarrow", "datasets", "faiss", "optuna", "psycopg",
          "s3fs", "tensorboard", "wandb", "mlflow", "starlette", "uvicorn")
BLOCKED = ",".join(EXTRAS)
TRAIN = ("--head", "xpool", "--epochs", "1", "--batch-size", "16", "--device", "cpu")


def test_a_missing_optional_module_names_the_extra_that_installs_it():
    with pytest.raises(MissingExtraError, match=r"avr export needs nosuchmodule, which is not "
                                                r"installed: pip install 'avr\[nosuchmodule\]'"):
        require("nosuchmodule", "avr export")


def test_an_installed_optional_module_is_returned():
    assert require("json", "x").dumps([1]) == "[1]"


def test_every_extra_module_is_mapped_to_its_extra():
    assert set(EXTRAS) <= {name.split(".")[0] for name in EXTRA_OF}


def test_every_module_imports_without_the_extras():
    modules = [info.name for info in pkgutil.walk_packages(avr.__path__, "avr.")
               if info.name != "avr.__main__"]
    code = (f"import sys, importlib\nfor m in {list(EXTRAS)!r}: sys.modules[m] = None\n"
            f"for m in {modules!r}: importlib.import_module(m)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(modules) > 60


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from support.specs import make_tiny_spec

    return make_learnable_store(tmp_path_factory.mktemp("base") / "cache", make_tiny_spec())


def base(*args, cwd):
    return run_avr(BLOCKED, *args, cwd=cwd, script="without_module.py")


def test_a_base_install_trains_and_evaluates(store, tmp_path):
    ok(base("train", "--cache", store, *TRAIN, "--run-dir", tmp_path / "run", cwd=tmp_path))
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))  # no TensorBoard, no file
    done = ok(base("eval", "--run", tmp_path / "run", "--device", "cpu", "--json", cwd=tmp_path))
    assert '"t2v"' in done.stdout


@pytest.mark.parametrize("args, extra", [
    (["sweep", "--head", "xpool", "--grid", "lr=1e-3", "--epochs", "1"], "sweep"),
    (["cache", "export", "{store}", "{tmp}/out.h5"], "h5"),
    (["cache", "export", "{store}", "{tmp}/out", "--format", "parquet"], "parquet"),
    (["index", "build", "{store}"], "index"),
    (["train", *TRAIN, "--logger", "wandb"], "wandb"),
    (["extract", "--dataset", "demo", "--root", "{tmp}/none", "--dask-workers", "2"], "dask"),
])
def test_a_command_that_needs_an_extra_names_it(store, tmp_path, args, extra):
    args = [a.format(store=store, tmp=tmp_path) for a in args]
    if args[0] in ("sweep", "train"):
        args += ["--cache", str(store)]
    assert_one_line_error(base(*args, cwd=tmp_path), f"pip install 'avr[{extra}]'")


def test_a_postgres_study_without_its_driver_names_the_extra(store, tmp_path):
    done = run_avr("psycopg", "sweep", "--cache", store, *TRAIN[:2], "--grid", "lr=1e-3",
                   "--epochs", "1", "--name", "p", "--storage", "postgresql://avr@127.0.0.1:9/avr",
                   cwd=tmp_path, script="without_module.py")
    assert_one_line_error(done, "pip install 'avr[postgres]'")
