"""A store at an ``s3://`` URL whose endpoint fails: missing credentials, a refused connection,
an endpoint that accepts and never answers. Each ends, within the timeouts and tries set by
``AVR_REMOTE_TIMEOUT`` and ``AVR_REMOTE_ATTEMPTS``, as one ``error:`` line naming the URL and
the cause."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from support.console import assert_one_line_error, run_avr

URL = "s3://avr-test/cache"


@pytest.fixture()
def silent_endpoint() -> Iterator[str]:
    """A loopback port whose connections are accepted (by the kernel's backlog) and never
    answered."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture()
def refusing_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: a connection is refused


@pytest.fixture()
def short_limits(monkeypatch):
    monkeypatch.setenv("AVR_REMOTE_TIMEOUT", "1")
    monkeypatch.setenv("AVR_REMOTE_ATTEMPTS", "2")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE":
                        "/nonexistent"}.items():
        monkeypatch.setenv(name, value)


def test_an_endpoint_that_never_answers_is_one_line_after_the_timeouts(silent_endpoint,
                                                                       short_limits, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    done = run_avr("cache", "info", URL, timeout=90)
    assert_one_line_error(done, URL, "timeout", "AVR_REMOTE_TIMEOUT")


def test_an_extract_into_an_endpoint_that_never_answers_is_one_line(silent_endpoint, short_limits,
                                                                     monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    done = run_avr("extract", "--dataset", "demo", "--root", tmp_path / "data", "--out", URL,
                   "--backbones", "tiny", "--device", "cpu", timeout=90)
    assert_one_line_error(done, URL, "timeout")


def test_a_refused_endpoint_is_one_line_naming_the_url(refusing_endpoint, short_limits,
                                                       monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", refusing_endpoint)
    done = run_avr("cache", "info", URL, timeout=90)
    assert_one_line_error(done, URL, "connect")


def test_missing_credentials_are_one_line_naming_the_url(refusing_endpoint, short_limits,
                                                         monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", refusing_endpoint)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    done = run_avr("cache", "info", URL, timeout=90)
    assert_one_line_error(done, URL, "credentials")


@pytest.mark.parametrize("value", ["0", "inf", "soon"])
def test_a_bad_remote_timeout_is_refused(value, monkeypatch, refusing_endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", refusing_endpoint)
    monkeypatch.setenv("AVR_REMOTE_TIMEOUT", value)
    assert_one_line_error(run_avr("cache", "info", URL), f"AVR_REMOTE_TIMEOUT={value}")
