"""The real servers a multi-machine sweep talks to, on the loopback: a PostgreSQL server (the
study's database) and moto's S3 server (the trials' run folders).

Each is reused when the environment names one (``.ci/run`` starts both and exports
``AVR_TEST_POSTGRES_URL`` and ``AVR_TEST_S3_ENDPOINT``), else started for the test session and
stopped after it. PostgreSQL runs as an unprivileged user (``postgres`` when the tests run as
root, as CI does: the server refuses root), its data in a temporary folder, listening on
127.0.0.1 only, on a free port.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

SERVER_USER = "postgres"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("PostgreSQL is not installed (no initdb): apt-get install postgresql")
    return Path(initdb).parent


class PostgresServer:
    """A PostgreSQL server of its own: ``start``, ``stop`` and ``start`` again (the same data),
    ``remove`` at the end."""

    def __init__(self):
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="avr-postgres-"))
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.data, SERVER_USER)
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def _run(self, program: str, *args) -> None:
        command = [str(postgres_bin() / program), *map(str, args)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stdout, done.stderr)

    def start(self) -> PostgresServer:
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.data} -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", self.data, "-l", self.data / "server.log", "-w", "-o",
                  options, "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.data, ignore_errors=True)


def new_database(server_url: str) -> str:
    """A new, empty database on the server at ``server_url`` (one per test): its URL."""
    import psycopg

    name = f"avr_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def postgres_server():
    """The URL of a running PostgreSQL server's ``postgres`` database."""
    if url := os.environ.get("AVR_TEST_POSTGRES_URL"):
        yield url
        return
    server = PostgresServer().start()
    yield server.url
    server.remove()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A database of its own for one test, on the session's server."""
    return new_database(postgres_server)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server: the AWS variables that point boto (and every `avr` subprocess) at it,
    with a bucket ``avr-test``."""
    endpoint = os.environ.get("AVR_TEST_S3_ENDPOINT")
    server = None
    if endpoint is None:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    _wait_for_port(int(endpoint.rsplit(":", 1)[1]))
    variables = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    with pytest.MonkeyPatch.context() as patch:  # `avr` subprocesses inherit them
        for name, value in variables.items():
            patch.setenv(name, value)
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).makedirs("avr-test", exist_ok=True)
        yield variables
    if server is not None:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_port(port: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")
