"""`avr serve` over real HTTP: search, thumbnails, clips with range requests, and every bad
request answered 4xx with the service still serving."""

from __future__ import annotations

import http.client
import json
import os
import shutil
from urllib.parse import quote, urlparse

import pytest

from support.service import get, get_json, running_service


@pytest.fixture(scope="module")
def service(demo_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("served") / "data"
    shutil.copytree(demo_runs["data"], root)
    outside = root.parent / "secret.txt"
    outside.write_text("not a clip")
    os.symlink(outside, root / "videos" / "leak.mp4")
    with running_service(demo_runs["tefal"], root.parent / "serve.log", "--root", root) as base:
        yield base, root


def raw_status(base: str, path: str) -> tuple[int, dict]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..``)."""
    url = urlparse(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_search_answers_the_k_best_videos_with_thumbnails_and_clips(service):
    base, root = service
    status, body = get_json(f"{base}/search?q={quote('a red circle moves')}&k=5")
    assert status == 200 and len(body["results"]) == 5
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    hit = body["results"][0]
    assert hit["captions"] and hit["video"] == f"/media/videos/{hit['video_id']}.mp4"
    status, headers, jpeg = get(base + hit["thumbnail"])
    assert status == 200 and headers["content-type"] == "image/jpeg" and jpeg[:2] == b"\xff\xd8"


def test_a_clip_is_served_in_ranges(service):
    base, root = service
    clip = sorted((root / "videos").glob("demo*.mp4"))[0]
    status, headers, body = get(f"{base}/media/videos/{clip.name}", {"Range": "bytes=10-109"})
    assert status == 206 and body == clip.read_bytes()[10:110]
    assert headers["content-range"] == f"bytes 10-109/{clip.stat().st_size}"


def test_explain_gives_the_pairs_scores_and_attention(service):
    base, _ = service
    status, body = get_json(f"{base}/explain?q=a+red+circle&video=demo0001")
    assert status == 200
    assert {"score", "visual_score", "audio_score"} <= set(body)
    assert len(body["explain"]["frame_attention"]) == 12
    assert body["thumbnail_frames"] == sorted(body["thumbnail_frames"])


@pytest.mark.parametrize("path, status", [
    ("/search?q=", 400),
    ("/search", 400),
    ("/search?q=" + "a" * 1001, 400),
    ("/search?q=dog&k=0", 400),
    ("/search?q=dog&k=101", 400),
    ("/search?q=dog&k=ten", 400),
    ("/thumbnails/no-such-video", 404),
    ("/explain?q=dog&video=no-such-video", 404),
    ("/media/videos/not-listed.mp4", 404),
    ("/no/such/route", 404),
])
def test_a_bad_request_is_a_4xx_json_error_and_the_next_one_is_served(service, path, status):
    base, _ = service
    answered, body = get_json(base + path)
    assert answered == status and body["error"]
    assert get_json(f"{base}/search?q=a+tone&k=2")[0] == 200


@pytest.mark.parametrize("path", [
    "/media/../../etc/passwd",
    "/media/videos/../../secret.txt",
    "/media/%2e%2e/%2e%2e/etc/passwd",
    "/media/..%2f..%2fetc%2fpasswd",
    "/media//etc/passwd",
    "/media/videos/leak.mp4",  # a symlink out of the root
])
def test_a_path_that_leaves_the_root_is_refused(service, path):
    base, _ = service
    status, body = raw_status(base, path)
    assert status in (403, 404) and "error" in body
    assert "not a clip" not in json.dumps(body)
    assert get_json(f"{base}/health")[0] == 200


def test_the_service_writes_nothing_to_the_store(demo_runs, service):
    base, _ = service
    before = {p: p.stat().st_mtime_ns for p in demo_runs["cache"].rglob("*")}
    for query in ("a red circle", "silence", "a drum"):
        get_json(f"{base}/search?q={quote(query)}&k=3")
    assert {p: p.stat().st_mtime_ns for p in demo_runs["cache"].rglob("*")} == before


def test_it_binds_the_loopback_unless_told_otherwise(service):
    base, root = service
    assert "serving tefal over" in (root.parent / "serve.log").read_text()
    assert "http://127.0.0.1:" in (root.parent / "serve.log").read_text()


def test_queries_run_on_one_intra_op_thread_on_the_cpu(service):
    base, _ = service
    assert get_json(f"{base}/health")[1]["threads"] == 1
