"""`avr cache ...` and `avr index ...`: look into a store, export it, verify and repair it, and
build its first-stage index."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from avr.cli import _options as options
from avr.cli._app import app, console

cache_app = typer.Typer(no_args_is_help=True, help="Inspect and export feature caches.")
app.add_typer(cache_app, name="cache")
index_app = typer.Typer(no_args_is_help=True, help="Build the first-stage faiss index of a cache.")
app.add_typer(index_app, name="index")


@cache_app.command("info")
def cache_info(
    path: str = options.store_argument(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Rows, arrays, shapes, bytes, backbones and failures of a store."""
    import json

    from rich.table import Table

    from avr.store.info import cache_info as read_info

    info = read_info(path)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    videos, captions = info["videos"], info["captions"]
    console.print(f"[bold]{info['path']}[/] dataset {info['dataset']}, schema "
                  f"{info['schema_version']}, created {info['created']}, fingerprint "
                  f"{info['fingerprint']}")
    splits = ", ".join(f"{k} {v}" for k, v in videos["per_split"].items())
    console.print(f"videos {videos['done']}/{videos['rows']} done ({splits}), "
                  f"{videos['failed']} failed; captions {captions['done']}/{captions['rows']}; "
                  f"{info['bytes'] / 1e6:,.1f} MB on disk")
    if info["absent_chunks"]:
        console.print(f"[red]{len(info['absent_chunks'])} chunks under done rows are absent[/] "
                      f"(first: {info['absent_chunks'][0]['array']} rows "
                      f"{info['absent_chunks'][0]['rows']}); run `avr cache verify {path}`")
    _print_unwritten(info["unwritten"])
    table = Table("array", "shape", "dtype", "chunks", "compression", "MB on disk")
    for name, array in info["arrays"].items():
        table.add_row(name, " x ".join(map(str, array["shape"])), array["dtype"],
                      " x ".join(map(str, array["chunks"])), array["compression"],
                      "unwritten" if array["unwritten"] else f"{array['stored_bytes'] / 1e6:,.2f}")
    console.print(table)
    backbones = Table("role", "model", "weights", "library")
    for role, backbone in info["backbones"].items():
        backbones.add_row(role, backbone["name"], backbone["weights"],
                          f"{backbone['library']} {backbone['version']}")
    console.print(backbones)
    for failure in info["failures"]:
        console.print(f"  [red]failed[/] {failure['video_id']}: {failure['reason']} "
                      f"({failure['path']})")


@cache_app.command("export")
def cache_export(
    path: str = options.store_argument(...),
    out: str = typer.Argument(..., help="Output file: a path or a URL."),
    format: str = typer.Option("h5", "--format", help="h5 (HDF5, same array names).",
                               callback=options.one_of("h5")),
):
    """Write a store to another format under the same array names."""
    from avr.store.export import export_h5
    from avr.store.info import stored_bytes

    written = export_h5(path, out)
    console.print(f"wrote {written} ({stored_bytes(written) / 1e6:,.1f} MB)")


@cache_app.command("verify")
def cache_verify(
    path: str = options.store_argument(),
    repair: bool = typer.Option(False, "--repair", help="Mark the damaged rows not done, so "
                                                         "that the next `avr extract` "
                                                         "recomputes exactly those."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Read every chunk under done rows: present, checksum holds. Exit 0 clean, 1 damaged."""
    import json

    from avr.store.integrity import repair_store, verify_store
    from avr.store.lock import StoreLock

    progress_console = None if as_json else console
    if repair:
        with StoreLock(path) as lock:
            report = verify_store(path, console=progress_console)
            if not report.clean:
                repair_store(path, report, lock)
    else:
        report = verify_store(path, console=progress_console)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_verify_report(report)
    if not report.clean:
        raise typer.Exit(1)


def _print_unwritten(unwritten: dict[str, str]) -> None:
    """The arrays a store leaves unwritten on purpose, grouped by the command that did."""
    by_command: dict[str, list[str]] = {}
    for name, command in unwritten.items():
        by_command.setdefault(command, []).append(name)
    for command, names in by_command.items():
        console.print(f"[yellow]{len(names)} arrays left unwritten on purpose[/] by `{escape(command)}` "
                      f"(not damage; runs that read them are refused): {', '.join(names)}",
                      highlight=False, soft_wrap=True)


def _print_verify_report(report) -> None:
    from rich.table import Table

    from avr.progress import rate_text

    checked = (f"{report.chunks:,} chunks of {report.arrays} arrays ({report.bytes / 1e6:,.1f} "
               f"MB decoded) in {report.seconds:.1f} s "
               f"({rate_text(report.bytes / 1e6, report.seconds, 'MB')})")
    if report.writer:
        console.print(f"[yellow]being written by {report.writer}[/]: rows it finishes after "
                      f"this check began were not checked")
    if report.without_checksum:
        console.print(f"[yellow]{len(report.without_checksum)} of {report.arrays} arrays were "
                      f"written without checksums[/]: absent and undecodable chunks are found "
                      f"there, silently altered bytes are not (`avr extract --overwrite` "
                      f"rewrites the store with them)")
    _print_unwritten(report.unwritten)
    if report.clean:
        done = ", ".join(f"{kind}s {len(report.done[kind])}/{report.rows[kind]} done"
                         for kind in report.rows)
        console.print(f"[bold green]clean[/]: {report.store}: {checked}; {done}")
        return
    console.print(f"[bold red]damaged[/]: {report.store}: {len(report.damage)} damaged chunks "
                  f"found in {checked}")
    table = Table("array", "chunk", "rows", "problem")
    for damage in report.damage:
        table.add_row(damage.array, damage.key, f"{damage.kind} {damage.rows[0]}-"
                      f"{damage.rows[1] - 1}", damage.problem)
    console.print(table)
    rows = report.damaged_rows()
    ids = report.damaged_video_ids()
    shown = f" ({', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''})" if ids else ""
    console.print(f"rows to recompute: {len(rows['video'])} videos{shown}, "
                  f"{len(rows['caption'])} captions")
    for name in report.missing_arrays:
        console.print(f"[red]array {name} is gone[/] (its zarr.json): re-extract with --overwrite")
    if report.unrepairable:
        names = ", ".join(sorted({d.array for d in report.unrepairable}))
        console.print(f"[red]not repairable by --repair[/]: the row index ({names}) cannot be "
                      f"recomputed from rows; re-extract with --overwrite")
    if report.repaired is not None:
        console.print(f"repaired: {len(rows['video'])} video rows and {len(rows['caption'])} "
                      f"caption rows marked not done, "
                      f"{len(report.repaired['rewritten_chunks'])} undecodable chunks cleared; "
                      f"run the same `avr extract` again to recompute them")
    else:
        console.print(f"`avr cache verify {report.store} --repair` marks them not done; the "
                      f"same `avr extract` then recomputes them")


@cache_app.command("break-lock")
def cache_break_lock(
    path: str = options.store_argument(...),
):
    """Remove a store's lock left by a writer that is gone (refused while it runs here)."""
    from avr.store.lock import break_lock

    holder = break_lock(path)
    if holder is None:
        console.print(f"{path}: no lock to remove")
    else:
        console.print(f"removed the lock of {path} held by {holder.describe()}")


@cache_app.command("thumbnails")
def cache_thumbnails(
    path: str = options.store_argument(...),
    root: Path = typer.Option(..., "--root", help="The dataset root the store was extracted "
                                                 "from (its videos/ folder holds the clips)."),
):
    """Record each video's path under --root and a strip of thumbnails from its frames (for a
    store written without them; under the store's lock)."""
    from avr.extract.thumbnails import add_thumbnails

    summary = add_thumbnails(path, root, console=console)
    console.print(f"{summary.store}: thumbnails of {summary.written:,} of {summary.videos:,} "
                  f"videos ({summary.with_file:,} with a file under {root}) in "
                  f"{summary.seconds:.1f} s", highlight=False)
    for video_id, why in summary.failed[:10]:
        console.print(f"[yellow]no thumbnail[/] {escape(video_id)}: {escape(why)}")


@index_app.command("build")
def index_build(
    cache: str = options.store_argument(),
    out: Optional[str] = typer.Option(None, "--out", help="Index folder, a path or a URL "
                                                          "(default: CACHE/index/)."),
    kind: str = typer.Option("auto", "--kind", help="auto | flat | ivf | hnsw (auto: flat up to "
                                                    "50,000 videos per split, IVF above).",
                             callback=options.one_of("auto", "flat", "ivf", "hnsw")),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1,
                                        help="IVF lists (default ~4 sqrt(videos))."),
    m: int = typer.Option(32, "--m", min=2, help="HNSW links per node."),
):
    """Index every extracted video's mean-pooled CLIP frames, one faiss index per split, for
    `avr eval --rerank-k` and `avr search`."""
    from avr.evaluate.index import build_index, read_meta

    path = build_index(cache, out, kind, nlist=nlist, m=m)
    meta = read_meta(path)
    for split, entry in meta["splits"].items():
        settings = "".join(f" {k}={v}" for k, v in entry["params"].items())
        console.print(f"{split}: {entry['videos']:,} videos, {entry['kind']}{settings} "
                      f"({entry['build_seconds']:.1f} s)")
    console.print(f"index -> {path}")
