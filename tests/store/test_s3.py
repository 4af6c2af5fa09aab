"""A store in a real S3 endpoint (moto's server on the loopback, ``support.s3``): the store
checks (``support.store_tests.StoreTests``) through the installed `avr` command, and what only
S3 has: a missing bucket or key named as a local missing store is, s3fs not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from avr.cli import main
from support.s3 import BUCKET, moto_endpoint
from support.store_tests import StoreTests

URL = f"s3://{BUCKET}/cache"


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_endpoint() as variables:
        yield variables


class TestS3Store(StoreTests):
    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def endpoint(cls, s3_endpoint):
        return s3_endpoint

    @classmethod
    def location(cls, name: str) -> str:
        return f"s3://{BUCKET}/{name}"


def run_avr(*args, pythonpath: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("avr")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((*pythonpath, str(Path.cwd()))),
           "COLUMNS": "200"}
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_a_missing_store_at_a_url_is_one_line_naming_it(s3_endpoint):
    done = run_avr("cache", "info", f"s3://{BUCKET}/nothing")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"s3://{BUCKET}/nothing: no avr cache here" in lines[0]


@pytest.mark.parametrize("command", [["cache", "info"], ["index", "build"], ["train", "--cache"],
                                     ["sweep", "--grid", "lr=1e-3", "--cache"],
                                     ["bench", "cache", "--cache"]])
def test_every_command_gives_a_missing_url_store_the_local_error(s3_endpoint, tmp_path, capsys,
                                                                 command):
    for missing in (f"s3://{BUCKET}/nothing", "s3://no-such-bucket/cache", tmp_path / "nothing"):
        with pytest.raises(SystemExit) as done:
            main([*command, str(missing)])
        assert done.value.code == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{missing}: no avr cache here (zarr.json not found)" in err


def test_without_s3fs_a_url_store_names_the_package_to_install(s3_endpoint, tmp_path):
    blocked = tmp_path / "no-s3fs"
    (blocked / "s3fs").mkdir(parents=True)
    (blocked / "s3fs" / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'s3fs\'", name="s3fs")\n')
    done = run_avr("cache", "info", URL, pythonpath=(str(blocked),))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert f"{URL}: Install s3fs to access S3; pip install s3fs" in lines[0]
