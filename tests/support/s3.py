"""A real S3 endpoint for tests: moto's server on the loopback, reached by s3fs exactly as AWS
would be, with the AWS variables that point boto at it set in this process (and so passed on to
every `avr` subprocess and dask worker started from it)."""

from __future__ import annotations

import logging
import os
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

BUCKET = "avr-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_endpoint(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 holding ``bucket``; yields the AWS variables set."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    variables = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    forget_s3_filesystems()
    try:
        # moto keeps its buckets in this process's memory, shared by every server started in it:
        # start each endpoint empty, whatever an earlier test module left.
        urllib.request.urlopen(urllib.request.Request(
            f"{variables['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"), timeout=30).close()
        s3().mkdir(bucket)
        yield variables
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
        forget_s3_filesystems()


def forget_s3_filesystems() -> None:
    """fsspec keeps one S3 filesystem per set of arguments, with the endpoint it read from the
    environment when it was made: one made against an earlier test module's server (stopped
    since) would otherwise be reused."""
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()


def s3():
    """A fresh s3fs filesystem (no listing cached from before an `avr` subprocess wrote)."""
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)
