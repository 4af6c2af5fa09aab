"""The routes of `avr serve` (starlette, run by uvicorn), over one ``Searcher``.

- ``GET /``: the page; ``GET /health``: the run, its head, the videos searched;
- ``GET /search?q=&k=``: the k best videos (ids, splits, scores, captions, thumbnail and clip
  URLs); ``GET /explain?q=&video=``: the head's scores and explanation of one pair;
- ``GET /thumbnails/{video id}``: the video's JPEG strip; ``GET /media/{path}``: a clip from the
  dataset root, with range requests (starlette's FileResponse), only files the store lists whose
  real path lies under the root (a symlink out of it, ``..``, an absolute path: refused).

Read-only: nothing is written, the store is opened for reading. Every bad request (an empty or
huge query, k out of range, an unknown id or route, a path that leaves the root) is answered
with a 4xx JSON ``{"error": ...}`` and the service keeps serving; a failure of ours is a 500 with
the same shape.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from avr.errors import AvrError
from avr.evaluate.search import Searcher
from avr.extras import require
from avr.store import schema
from avr.store.media import media_root, read_thumbnails, read_video_paths

MAX_QUERY_CHARS = 1000
MAX_K = 100
PAGE = Path(__file__).with_name("page.html")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Media:
    """What the routes read besides the searcher: thumbnails and clip paths by video id."""

    def __init__(self, searcher: Searcher, root: str | Path | None):
        self.searcher = searcher
        group = searcher.group
        recorded = root if root is not None else media_root(group)
        self.root = Path(os.path.realpath(recorded)) if recorded else None
        rows = np.arange(len(searcher.video_ids))
        self.paths = dict(zip(searcher.video_ids.tolist(), read_video_paths(group, rows)))
        self.listed = {path for path in self.paths.values() if path}
        self.has_thumbnails = schema.THUMBNAILS in group

    def thumbnail(self, video_id: str) -> bytes | None:
        row = self.row(video_id)
        return read_thumbnails(self.searcher.group, np.asarray([row]))[0]

    def row(self, video_id: str) -> int:
        row = self.searcher.row_of.get(video_id)
        if row is None:
            raise BadRequest(404, f"unknown video id {video_id!r}")
        return row

    def clip_url(self, video_id: str) -> str | None:
        path = self.paths.get(video_id)
        if not path or self.root is None or not (self.root / path).is_file():
            return None
        return f"/media/{path}"

    def clip_file(self, path: str) -> Path:
        """The file of a clip the store lists, refused unless its real path is under the root."""
        if self.root is None:
            raise BadRequest(404, "no dataset root: start avr serve with --root DIR")
        target = Path(os.path.realpath(self.root / path))
        if os.path.isabs(path) or not target.is_relative_to(self.root):
            raise BadRequest(403, f"{path!r} is outside the dataset root")
        if path not in self.listed or not target.is_file():
            raise BadRequest(404, f"no clip {path!r} under the dataset root")
        return target


def query_arguments(params) -> tuple[str, int]:
    query = params.get("q", "")
    if not query.strip():
        raise BadRequest(400, "the query is empty: /search?q=a+dog+barks")
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(400, f"the query has {len(query)} characters; at most "
                              f"{MAX_QUERY_CHARS}")
    try:
        k = int(params.get("k", "10"))
    except ValueError:
        raise BadRequest(400, f"k must be a whole number, got {params.get('k')!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(400, f"k must be in 1..{MAX_K}, got {k}")
    return query, k


def make_app(searcher: Searcher, root: str | Path | None = None):
    """The starlette application over ``searcher``; clips are served from ``root`` (default:
    the dataset root the store records)."""
    import torch

    require("starlette", "avr serve")
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    media_files = Media(searcher, root)
    page = PAGE.read_text(encoding="utf-8")

    def index(request):
        return HTMLResponse(page)

    def health(request):
        return JSONResponse({"status": "ok", "run": str(searcher.run_dir),
                             "head": searcher.head.name, "store": str(searcher.cache),
                             "splits": [g.split for g in searcher.galleries],
                             "videos": searcher.num_videos,
                             "thumbnails": media_files.has_thumbnails,
                             "media_root": str(media_files.root) if media_files.root else None,
                             "threads": torch.get_num_threads()})

    def search(request):
        query, k = query_arguments(request.query_params)
        started = time.perf_counter()
        hits = searcher.search(query, k)
        return JSONResponse({"query": query, "k": k,
                             "seconds": round(time.perf_counter() - started, 4),
                             "results": [{"rank": rank, "video_id": hit.video_id,
                                          "split": hit.split, "score": hit.score,
                                          "captions": hit.captions,
                                          "thumbnail": f"/thumbnails/{hit.video_id}",
                                          "video": media_files.clip_url(hit.video_id)}
                                         for rank, hit in enumerate(hits, 1)]})

    def explain(request):
        query, _ = query_arguments(request.query_params)
        video_id = request.query_params.get("video", "")
        row = media_files.row(video_id)
        from avr.extract.thumbnails import strip_frames

        frame_mask = searcher.group[schema.FRAME_MASK][row]
        return JSONResponse({"query": query, "video_id": video_id,
                             **searcher.explain(query, video_id),
                             "thumbnail_frames": strip_frames(int(np.sum(frame_mask))).tolist(),
                             "thumbnail": f"/thumbnails/{video_id}",
                             "video": media_files.clip_url(video_id)})

    def thumbnail(request):
        jpeg = media_files.thumbnail(request.path_params["video_id"])
        if jpeg is None:
            raise BadRequest(404, "this store holds no thumbnail of "
                                  f"{request.path_params['video_id']!r}")
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    def media(request):
        return FileResponse(media_files.clip_file(request.path_params["path"]))

    def bad_request(request, error: BadRequest):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    def http_error(request, error: HTTPException):
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    def avr_error(request, error: AvrError):
        return JSONResponse({"error": str(error)}, status_code=400)

    def failure(request, error: Exception):
        return JSONResponse({"error": f"{type(error).__name__}: {error}"}, status_code=500)

    routes = [Route("/", index), Route("/health", health), Route("/search", search),
              Route("/explain", explain), Route("/thumbnails/{video_id:path}", thumbnail),
              Route("/media/{path:path}", media)]
    return Starlette(routes=routes, exception_handlers={
        BadRequest: bad_request, HTTPException: http_error, AvrError: avr_error,
        Exception: failure})


def serve(run: str | Path | None, *, host: str = "127.0.0.1", port: int = 8000,
          root: str | Path | None = None, split: str = "all", device: str = "auto",
          index: str | Path | None = None, memory_budget: float | None = None,
          threads: int | None = None, on_ready=None) -> None:
    """Load the run once (head, text towers, encoded videos) and serve it until interrupted.
    ``threads``: torch's intra-op threads (default: 1 on the CPU, where one query's small
    tensors gain nothing from more threads and lose to their hand-offs; BENCHMARKS.md, *Search
    and serving*). ``on_ready(searcher)`` is called once everything is loaded, before the port
    opens."""
    import torch

    from avr.device import resolve_device

    uvicorn = require("uvicorn", "avr serve")
    if root is not None and not Path(root).is_dir():
        raise AvrError(f"--root {root}: no such folder")
    if threads is not None or resolve_device(device).type == "cpu":
        torch.set_num_threads(threads or 1)
    searcher = Searcher(run, split=split, device=device, index=index,
                        memory_budget=memory_budget)
    app = make_app(searcher, root)
    if on_ready is not None:
        on_ready(searcher)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
