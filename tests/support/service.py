"""`avr serve` as a user starts it: a subprocess of this checkout on a free loopback port,
stopped at the end."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from support.paths import REPO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_service(run: Path, log: Path, *args, timeout: float = 240):
    """Start `avr serve --run RUN ARGS` and yield its base URL once /health answers."""
    port = free_port()
    script = Path(sys.executable).with_name("avr")
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(script), "serve", "--run", str(run), "--port", str(port), "--device", "cpu",
             *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"avr serve exited: {log.read_text()}")
            try:
                get(base + "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"avr serve did not answer: {log.read_text()}")
                time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET, 4xx and 5xx included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def get_json(url: str) -> tuple[int, dict]:
    status, _, body = get(url)
    return status, json.loads(body)
