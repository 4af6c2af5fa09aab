"""`avr cache ...` and `avr index ...`: look into a store, export it, verify and repair it, and
build its first-stage index."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from avr.cli import _options as options
from avr.cli._app import app, command_group, console

EXPORT_FORMATS = ("h5", "npy", "parquet", "clip-retrieval", "hf")  # avr.store.export.FORMATS

cache_app = command_group("Inspect and export feature caches.")
app.add_typer(cache_app, name="cache")
index_app = command_group("Build the first-stage faiss index of a cache.")
app.add_typer(index_app, name="index")


@cache_app.command("info")
def cache_info(
    store: Optional[str] = options.store_argument(),
    cache: Optional[str] = options.store_option(),
    as_json: bool = options.json_flag(),
):
    """Rows, arrays, shapes, bytes, backbones and failures of a store."""
    import json

    from rich.table import Table

    from avr.store.info import cache_info as read_info

    path = options.the_store(store, cache)
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
    store: Optional[str] = options.store_argument(),
    out_argument: Optional[str] = typer.Argument(None, metavar="OUT", show_default=False,
                                                 help="The same as --out."),
    cache: Optional[str] = options.store_option(),
    out: Optional[str] = typer.Option(None, "--out", help="Where to write: a file for h5, a "
                                                          "folder for the others; a path or a "
                                                          "URL."),
    format: str = typer.Option("h5", "--format", help="h5 (one HDF5 file, the store's arrays) "
                               "| npy (one memory-mappable .npy per array) | parquet (videos "
                               "and captions tables: ids, texts, embeddings) | clip-retrieval "
                               "(img_emb/, text_emb/, metadata/) | hf (a datasets folder for "
                               "load_from_disk).", callback=options.one_of(*EXPORT_FORMATS)),
    splits: Optional[str] = typer.Option(None, "--splits", help="Comma-separated splits to "
                                                                "export (default: all)."),
    arrays: Optional[str] = typer.Option(None, "--arrays", help="Comma-separated arrays to "
                                         "export (default: all for h5 and npy; for parquet "
                                         "and hf, columns beside the embeddings)."),
    as_json: bool = options.json_flag(),
):
    """Write a store in the forms other tools read (docs/cache.md, *Exports*)."""
    import json

    from avr.errors import AvrError
    from avr.store.export import export_store

    if out_argument is not None and out is not None and out_argument != out:
        raise AvrError(f"the output is given twice ({out_argument} and --out {out}): give one")
    if (out or out_argument) is None:
        raise AvrError("give where to write: --out PATH (a file for h5, a folder otherwise)")
    summary = export_store(options.the_store(store, cache), out or out_argument, format,
                           splits=tuple(options.names(splits)) if splits else None,
                           arrays=tuple(options.names(arrays)) if arrays else None,
                           console=None if as_json else console)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"wrote {escape(summary['out'])} ({summary['format']}: {summary['videos']:,} "
                  f"videos, {summary['captions']:,} captions, {len(summary['files'])} files)",
                  highlight=False)


@cache_app.command("verify")
def cache_verify(
    store: Optional[str] = options.store_argument(),
    cache: Optional[str] = options.store_option(),
    repair: bool = typer.Option(False, "--repair", help="Mark the damaged rows not done, so "
                                                         "that the next `avr extract` "
                                                         "recomputes exactly those."),
    as_json: bool = options.json_flag(),
):
    """Read every chunk under done rows: present, checksum holds; every array's metadata
    against the schema. Exit 0 clean, 1 damaged."""
    import json

    from avr.store.integrity import repair_store, verify_store
    from avr.store.lock import StoreLock

    path = options.the_store(store, cache)
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
    if report.metadata:
        console.print(f"[bold red]damaged[/]: {escape(report.store)}: the metadata of its arrays "
                      f"disagrees with the schema (chunks not read):", highlight=False)
        for difference in report.metadata:
            console.print(f"  {escape(difference)}", highlight=False, soft_wrap=True)
        console.print("the zarr.json files were edited or damaged; --repair cannot fix this: "
                      "re-extract with --overwrite")
        return
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
    store: Optional[str] = options.store_argument(),
    cache: Optional[str] = options.store_option(),
    as_json: bool = options.json_flag(),
):
    """Remove a store's lock left by a writer that is gone (refused while it runs here)."""
    import json
    from dataclasses import asdict

    from avr.store.lock import break_lock

    path = options.the_store(store, cache)
    holder = break_lock(path)
    if as_json:
        print(json.dumps({"store": path, "removed": asdict(holder) if holder else None}))
    elif holder is None:
        console.print(f"{path}: no lock to remove")
    else:
        console.print(f"removed the lock of {path} held by {holder.describe()}")


@cache_app.command("thumbnails")
def cache_thumbnails(
    store: Optional[str] = options.store_argument(),
    cache: Optional[str] = options.store_option(),
    root: Path = typer.Option(..., "--root", help="The dataset root the store was extracted "
                                                 "from (its videos/ folder holds the clips)."),
    videos_dir: Optional[Path] = typer.Option(None, "--videos-dir", help="The folder of the "
                                              "clips, relative to --root or absolute (default: "
                                              "where `avr extract` looks)."),
    as_json: bool = options.json_flag(),
):
    """Record each video's path under --root and a strip of thumbnails from its frames (for a
    store written without them; under the store's lock)."""
    from avr.extract.thumbnails import add_thumbnails

    path = options.the_store(store, cache)
    summary = add_thumbnails(path, root, videos_dir=videos_dir,
                             console=None if as_json else console)
    if as_json:
        from dataclasses import asdict

        options.print_json(asdict(summary))
        return
    console.print(f"{summary.store}: thumbnails of {summary.written:,} of {summary.videos:,} "
                  f"videos ({summary.with_file:,} with a file under {root}) in "
                  f"{summary.seconds:.1f} s", highlight=False)
    for video_id, why in summary.failed[:10]:
        console.print(f"[yellow]no thumbnail[/] {escape(video_id)}: {escape(why)}")


@index_app.command("build")
def index_build(
    store: Optional[str] = options.store_argument(),
    cache: Optional[str] = options.store_option(),
    out: Optional[str] = typer.Option(None, "--out", help="Index folder, a path or a URL "
                                                          "(default: CACHE/index/)."),
    kind: str = typer.Option("auto", "--kind", help="auto | flat | ivf | hnsw (auto: flat up to "
                                                    "50,000 videos per split, IVF above).",
                             callback=options.one_of("auto", "flat", "ivf", "hnsw")),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1,
                                        help="IVF lists (default ~4 sqrt(videos))."),
    m: int = typer.Option(32, "--m", min=2, help="HNSW links per node."),
    embeddings: str = typer.Option("clip", "--embeddings", help="clip (mean-pooled CLIP frames, "
                                   "for eval's --rerank-k and any run's search) | run:RUN (that "
                                   "run's own video vectors, for heads with one vector per "
                                   "video such as meanp; serves `avr search --run RUN`; the "
                                   "store defaults to the run's)."),
    device: str = options.device("cpu"),
    as_json: bool = options.json_flag(),
):
    """Index every extracted video, one faiss index per split (int64 ids: store rows, mapped to
    video ids in video_ids.json), for `avr eval --rerank-k` and `avr search`."""
    import json

    from avr.evaluate.index import build_index, read_meta

    default = None if embeddings.startswith("run:") else "cache"
    path = build_index(options.the_store(store, cache, default), out, kind, nlist=nlist, m=m,
                       embeddings=embeddings, device=device)
    meta = read_meta(path)
    if as_json:
        print(json.dumps({"index": str(path), **meta}, indent=2))
        return
    for split, entry in meta["splits"].items():
        settings = "".join(f" {k}={v}" for k, v in entry["params"].items())
        console.print(f"{split}: {entry['videos']:,} videos, {entry['kind']}{settings} "
                      f"({entry['build_seconds']:.1f} s)")
    console.print(f"index of {meta['vectors']} -> {path}", highlight=False)
