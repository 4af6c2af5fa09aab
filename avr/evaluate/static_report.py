"""`avr report RUN [--against RUN_B] --out DIR`: one static HTML page (it opens from disk, no
server) that shows what a head retrieves.

- the metrics and the per-tag table (both runs side by side with ``--against``), recall at K;
- the worst failures first: each query, its ground-truth video, the videos ranked above it,
  their thumbnails, and the head's explanation of the query with its own video (attention over
  frames with the thumbnails under them, attention over audio, gate and threshold values);
- with ``--against``, the captions whose rank moved most between the two runs, both ways (e.g.
  TEFAL against X-Pool: where audio helped and where it hurt), with both heads' explanations.

Both runs are evaluated afresh on the split (``evaluate_run`` with its per-query table), so the
page never shows stale numbers; they must have been evaluated on the same captions of the same
videos. Everything goes under DIR: ``index.html``, ``thumbs/`` (the store's strips), ``plots/``.
A store without thumbnails gives grey placeholders.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avr.device import resolve_device
from avr.errors import AvrError
from avr.evaluate import report
from avr.evaluate.evaluator import EvalConfig, EvalResult, evaluate_run, explain_store_pairs, \
    open_run, resolve_run
from avr.store import schema
from avr.store.group import open_store
from avr.store.media import read_thumbnails

FAILURES = 12
MOVED = 12
ABOVE = 5  # videos ranked above a failure's own that its card shows


@dataclass
class ReportSettings:
    split: str = "test"
    failures: int = FAILURES
    moved: int = MOVED
    device: str = "auto"
    memory_budget: float | None = None


@dataclass
class RunView:
    """One evaluated run and what its cards need."""

    result: EvalResult
    head: object  # RetrievalHead
    device: object  # torch.device

    @property
    def name(self) -> str:
        head, folder = self.result.head, self.result.run_dir.name
        return head if folder == head else f"{head} ({folder})"


def write_static_report(run: str | Path | None, out_dir: str | Path,
                        against: str | Path | None = None,
                        settings: ReportSettings | None = None) -> Path:
    """Evaluate ``run`` (and ``against``) and write ``out_dir/index.html``; returns its path."""
    settings = settings or ReportSettings()
    out_dir = Path(out_dir)
    for sub in ("thumbs", "plots"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    first = _evaluate(run, settings, device)
    second = _evaluate(against, settings, device) if against is not None else None
    if second is not None:
        _check_same_captions(first.result, second.result)
    group, spec = open_store(first.result.cache)
    page = Page(out_dir, group, spec)
    failures = worst_failures(first.result, settings.failures)
    sections = [page.failures_section(first, failures)]
    if second is not None:
        for better, worse in ((first, second), (second, first)):
            moved = moved_most(better.result, worse.result, settings.moved)
            sections.append(page.moved_section(better, worse, moved))
    report.plot_recall_curves(first.result, out_dir / "recall_at_k.png")
    path = out_dir / "index.html"
    path.write_text(page.document(first, second, sections), encoding="utf-8")
    return path


def _evaluate(run, settings: ReportSettings, device) -> RunView:
    result = evaluate_run(run, config=EvalConfig(split=settings.split, device=str(device),
                                                 memory_budget=settings.memory_budget,
                                                 queries=True))
    head, _, _ = open_run(resolve_run(run), result.cache, device)
    return RunView(result, head, device)


def _check_same_captions(a: EvalResult, b: EvalResult) -> None:
    if list(a.caption_rows) != list(b.caption_rows) or a.video_ids != b.video_ids:
        raise AvrError(f"--against {b.run_dir}: evaluated on other captions or videos than "
                       f"{a.run_dir} ({b.cache} against {a.cache}); compare runs of one store")


def worst_failures(result: EvalResult, count: int) -> list[int]:
    """Positions of the captions ranked worst (their video extracted), worst first."""
    queries = result.queries
    ranks = np.asarray(queries["rank"])
    usable = np.flatnonzero((result.caption_video >= 0) & (ranks > 1))
    return usable[np.argsort(-ranks[usable], kind="stable")][:count].tolist()


def moved_most(better: EvalResult, worse: EvalResult, count: int) -> list[int]:
    """Positions of the captions ``better`` ranks most places above ``worse``, largest first."""
    gain = np.asarray(worse.queries["rank"]) - np.asarray(better.queries["rank"])
    usable = np.flatnonzero((better.caption_video >= 0) & (gain > 0))
    return usable[np.argsort(-gain[usable], kind="stable")][:count].tolist()


class Page:
    """The page's HTML, its thumbnails and plots, written under ``out_dir``."""

    def __init__(self, out_dir: Path, group, spec: schema.CacheSpec):
        self.out_dir, self.group, self.spec = out_dir, group, spec
        self.row_of = {str(v): r for r, v in enumerate(group[schema.VIDEO_ID][:])}
        self._thumbs: dict[int, str | None] = {}
        self._plots = 0

    # ---- pieces --------------------------------------------------------------------------------
    def thumb(self, video_id: str) -> str:
        """An <img> of the video's strip (written once into thumbs/), or a placeholder."""
        row = self.row_of[video_id]
        if row not in self._thumbs:
            jpeg = read_thumbnails(self.group, np.asarray([row]))[0]
            name = None
            if jpeg is not None:
                name = f"thumbs/{row}.jpg"
                (self.out_dir / name).write_bytes(jpeg)
            self._thumbs[row] = name
        name = self._thumbs[row]
        if name is None:
            return '<div class="thumb placeholder">no thumbnail</div>'
        return f'<img class="thumb" src="{name}" alt="{_e(video_id)}">'

    def video(self, video_id: str, note: str) -> str:
        return (f'<figure class="video">{self.thumb(video_id)}<figcaption><code>'
                f'{_e(video_id)}</code> {note}</figcaption></figure>')

    def plot(self, view: RunView, caption_row: int, video_id: str, title: str) -> str:
        """The head's explanation of one pair as a PNG under plots/ (an <img>)."""
        video_row = self.row_of[video_id]
        explained = explain_store_pairs(view.head, view.result.cache, np.asarray([caption_row]),
                                        np.asarray([video_row]), view.device)
        if not explained:
            return f'<p class="note">{_e(view.result.head)} explains no pair</p>'
        jpeg = read_thumbnails(self.group, np.asarray([video_row]))[0]
        tiles = frames = None
        if jpeg is not None:
            from avr.extract.thumbnails import strip_frames, strip_tiles

            valid = int(np.asarray(self.group[schema.FRAME_MASK][video_row]).sum())
            frames = strip_frames(valid)
            tiles = strip_tiles(jpeg, len(frames))
        self._plots += 1
        name = f"plots/pair-{self._plots}.png"
        report.plot_pair({k: v[0] for k, v in explained.items()}, self.out_dir / name, title,
                         tiles=tiles, tile_frames=frames,
                         audio_grid=(self.spec.ast_freq_patches, self.spec.ast_time_patches))
        return f'<img class="plot" src="{name}" alt="explanation: {_e(title)}">'

    # ---- sections ------------------------------------------------------------------------------
    def failures_section(self, view: RunView, positions: list[int]) -> str:
        queries, result = view.result.queries, view.result
        cards = []
        for j in positions:
            above = [queries[f"top{i}_video"][j] for i in range(1, ABOVE + 1)
                     if f"top{i}_video" in queries and i < queries["rank"][j]]
            scores = [queries[f"top{i}_score"][j] for i in range(1, len(above) + 1)]
            own = queries["video"][j]
            cards.append(
                f'<article class="card failure">{self._query(queries, j)}'
                f'<p>rank <b>{queries["rank"][j]}</b> of {result.num_videos}'
                f'{_modality_note(queries, j)}</p>'
                f'<div class="row"><div><h4>its video</h4>'
                f'{self.video(own, "score %.3f" % queries["score"][j])}</div>'
                f'<div><h4>ranked above it</h4><div class="row">'
                + "".join(self.video(v, f"score {s:.3f}") for v, s in zip(above, scores))
                + "</div></div></div>"
                + self.plot(view, queries["caption_row"][j], own,
                            f"{result.head}: {queries['caption'][j]}")
                + "</article>")
        return (f'<section id="failures"><h2>Worst failures of {_e(view.name)}</h2>'
                f'<p>Captions whose own video ranked lowest, worst first.</p>'
                + ("".join(cards) or "<p>None: every caption found its video first.</p>")
                + "</section>")

    def moved_section(self, better: RunView, worse: RunView, positions: list[int]) -> str:
        qb, qw = better.result.queries, worse.result.queries
        cards = []
        for j in positions:
            own = qb["video"][j]
            cards.append(
                f'<article class="card moved">{self._query(qb, j)}'
                f'<p>{_e(better.name)} ranks its video <b>{qb["rank"][j]}</b>, '
                f'{_e(worse.name)} <b>{qw["rank"][j]}</b></p>'
                f'<div class="row">{self.video(own, "its video")}'
                f'{self.video(qw["top1_video"][j], _e(worse.result.head) + " top 1")}</div>'
                f'<div class="row">'
                + self.plot(better, qb["caption_row"][j], own, f"{better.result.head}: "
                            f"{qb['caption'][j]}")
                + self.plot(worse, qw["caption_row"][j], own, f"{worse.result.head}: "
                            f"{qw['caption'][j]}")
                + "</div></article>")
        return (f'<section class="moved"><h2>Where {_e(better.name)} beats '
                f'{_e(worse.name)}</h2><p>Captions whose video {_e(better.result.head)} ranks '
                f'most places higher, largest move first.</p>'
                + ("".join(cards) or "<p>None.</p>") + "</section>")

    @staticmethod
    def _query(queries: dict, j: int) -> str:
        tag = queries["tag"][j]
        return (f'<h3 class="query">{_e(queries["caption"][j])}</h3>'
                + (f'<span class="tag">{_e(tag)}</span>' if tag else ""))

    # ---- the document ---------------------------------------------------------------------------
    def document(self, first: RunView, second: RunView | None, sections: list[str]) -> str:
        views = [first] + ([second] if second is not None else [])
        result = first.result
        title = " vs ".join(v.name for v in views) + f" on {result.split}"
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
                f'<title>avr report: {_e(title)}</title><style>{STYLE}</style></head><body>'
                f'<h1>{_e(title)}</h1><p class="note">store <code>{_e(str(result.cache))}'
                f'</code>; {result.num_captions} captions x {result.num_videos} videos'
                + (f"; {len(result.missing_videos)} videos failed extraction (their captions "
                   f"count as failed queries)" if result.missing_videos else "")
                + "</p>" + _metrics_table(views) + _tags_table(views)
                + '<img class="plot" src="recall_at_k.png" alt="recall at K">'
                + "".join(sections) + "</body></html>\n")


def _metrics_table(views: list[RunView]) -> str:
    head = "".join(f"<th>{k}</th>" for k in ("R@1", "R@5", "R@10", "MdR", "MnR"))
    body = ""
    for view in views:
        for direction in ("t2v", "v2t"):
            m = view.result.metrics[direction]
            body += (f"<tr><td>{_e(view.name)} {direction}</td>"
                     + "".join(f"<td>{m[k]:.1f}</td>" for k in ("R1", "R5", "R10", "MdR", "MnR"))
                     + "</tr>")
    return f'<table id="metrics"><tr><th></th>{head}</tr>{body}</table>'


def _tags_table(views: list[RunView]) -> str:
    tags = sorted({tag for view in views for tag in view.result.tags})
    if not tags:
        return ""
    head = "".join(f"<th>{_e(v.name)} R@1</th><th>R@5</th>" for v in views)
    body = ""
    for tag in tags:
        cells = ""
        for view in views:
            m = view.result.tags.get(tag)
            cells += (f"<td>{m['t2v']['R1']:.1f}</td><td>{m['t2v']['R5']:.1f}</td>" if m
                      else "<td>-</td><td>-</td>")
        captions = views[0].result.tags.get(tag, {}).get("captions", "")
        body += f"<tr><td>{_e(tag)} ({captions})</td>{cells}</tr>"
    return f'<h2>By tag (text to video)</h2><table id="tags"><tr><th>tag</th>{head}</tr>' \
           f'{body}</table>'


def _modality_note(queries: dict, j: int) -> str:
    if "visual_rank" not in queries:
        return ""
    return (f"; without audio {queries['visual_rank'][j]}, without frames "
            f"{queries['audio_rank'][j]}")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td:first-child { text-align: left; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; margin: 1em 0; }
.query { margin: 0 0 0.3em 0; }
.tag { background: #eef; border-radius: 4px; padding: 0 0.4em; font-size: 0.85em; }
.row { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
.video { margin: 0; }
.video figcaption { font-size: 0.8em; }
.thumb { height: 64px; image-rendering: pixelated; display: block; }
.placeholder { width: 256px; background: #ddd; color: #666; font-size: 0.8em;
               display: flex; align-items: center; justify-content: center; }
.plot { max-width: 100%; margin-top: 0.5em; }
.note { color: #666; }
h4 { margin: 0.2em 0; font-size: 0.9em; }
"""
