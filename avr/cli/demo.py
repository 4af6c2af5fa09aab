"""`avr demo` and `avr bench ...`: the whole pipeline on generated clips, and the measurements
of each stage (BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from avr.cli import _options as options
from avr.cli._app import app, command_group, console
from avr.errors import AvrError


@app.command()
def demo(
    workdir: Path = typer.Option(Path("avr-demo"), help="Where data, cache, runs and report go."),
    seed: int = typer.Option(0, help="Seed of the clips, the tiny backbones and training."),
    budget: float = typer.Option(150.0, min=0.0, help="Seconds: heads beyond xpool and tefal "
                                                      "train only while the demo fits this."),
    workers: Optional[int] = typer.Option(None, min=0, help="Decode processes."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON on stdout (no "
                                 "progress): each head's metrics, audio-only captions included."),
):
    """Generate the demo clips, extract with tiny backbones, train, evaluate, compare heads."""
    from avr.demo import DemoConfig, demo_json, demo_table, run_demo

    result = run_demo(DemoConfig(workdir=workdir, seed=seed, budget_s=budget, workers=workers),
                      console=None if as_json else console)
    if as_json:
        options.print_json(demo_json(result))
        return
    console.print(demo_table(result))
    if result.skipped:
        console.print(f"not trained within the budget: {', '.join(result.skipped)} "
                      f"(train them with `avr train --cache {workdir / 'cache'} --head NAME`)")
    if result.report is not None:
        console.print(f"report with plots: {result.report}")
    console.print(f"demo finished in {result.seconds:.0f} s")



bench_app = command_group("Measure a stage on VATEX-shaped work beside the straightforward way "
                          "(BENCHMARKS.md), or write a VATEX-shaped store from a generator.")
app.add_typer(bench_app, name="bench")


def _bench_device(device: str):
    """The torch device and its name as BENCHMARKS.md records it."""
    import platform

    import torch

    from avr.device import resolve_device

    torch_device = resolve_device(device)
    name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} x {torch.get_num_threads()} threads"
    return torch_device, name


def _print_figures(what: str, name: str, scale: float | None, figures,
                   as_json: bool = False) -> None:
    if as_json:
        from dataclasses import asdict

        options.print_json({"bench": what, "device": name, "scale": scale,
                            "figures": [asdict(figure) for figure in figures]})
        return
    console.print(f"[bold]avr bench {what}[/] on {name}" + (f", scale {scale}" if scale else ""))
    for figure in figures:
        console.print(figure.line(), markup=False, highlight=False, soft_wrap=True)


# Seconds of the 8 minutes a lent GPU gives `avr bench gpu`, start-up and imports left aside.
DEFAULT_GPU_BUDGET_S = 420.0
SCALE_HELP = "Fraction of VATEX's rows (per-row shapes stay)."


@bench_app.command("train")
def bench_train(
    head: str = typer.Option("tefal", help="Head to train.", callback=options.known_head),
    scale: float = typer.Option(1.0, help=SCALE_HELP, callback=options.positive),
    device: str = options.device(),
    steps: Optional[int] = typer.Option(None, min=1, help="Time this many steps (and "
                                                          "extrapolate the epoch without "
                                                          "--cache)."),
    cache: Optional[str] = typer.Option(None, help="Train on this store's train split (a path "
                                                   "or a URL) as `avr train` would, instead of "
                                                   "device-resident random tokens."),
    memory_budget: Optional[float] = options.memory_budget(),
    resident: str = options.resident("fp16"),
    batch_size: int = typer.Option(128, "--batch-size", min=2),
    as_json: bool = options.json_flag(),
):
    """One training epoch of a head: on device-resident VATEX-shaped tokens, or with --cache on
    a store under a memory budget (plan, pairs/s, bytes/s, peak memory; a streamed split also
    beside a raw read of its chunk files)."""
    from avr import bench as benches

    torch_device, name = _bench_device(device)
    if cache is None:
        if memory_budget is not None or resident != "fp16":
            raise AvrError("--memory-budget and --resident apply to a store: give --cache")
        figures = benches.bench_train(head, scale=scale, device=torch_device, steps=steps,
                                      batch_size=batch_size)
        _print_figures("train", name, scale, figures, as_json)
        return
    from avr.fuse.loading import require_head_arrays

    require_head_arrays(cache, head, {})
    figures = benches.bench_train_store(cache, head, device=torch_device, batch_size=batch_size,
                                        steps=steps, memory_budget=memory_budget,
                                        resident=resident)
    _print_figures(f"train --cache {cache}", name, None, figures, as_json)


@bench_app.command("eval")
def bench_eval(
    head: str = typer.Option("tefal", help="Head to score with.", callback=options.known_head),
    scale: float = typer.Option(1.0, help=SCALE_HELP, callback=options.positive),
    device: str = options.device(),
    as_json: bool = options.json_flag(),
):
    """Score a VATEX-shaped test split in chunks, beside one pair at a time."""
    from avr import bench as benches

    torch_device, name = _bench_device(device)
    _print_figures("eval", name, scale, benches.bench_eval(head, scale=scale,
                                                           device=torch_device), as_json)


@bench_app.command("cache")
def bench_cache(
    device: str = options.device(),
    gigabytes: float = typer.Option(4.0, help="Store size to write and read.",
                                    callback=options.positive),
    cache: Optional[str] = typer.Option(None, help="Read this store's train audio tokens (a "
                                                   "path or a URL) instead of writing a store "
                                                   "of --gigabytes."),
    as_json: bool = options.json_flag(),
):
    """Read a store's audio tokens into memory, beside a raw read of the same bytes."""
    from avr import bench as benches

    torch_device, name = _bench_device(device)
    _print_figures("cache", name, None, benches.bench_cache(gigabytes=gigabytes,
                                                            device=torch_device, store=cache),
                   as_json)


@bench_app.command("extract")
def bench_extract(
    device: str = options.device(),
    clips: int = typer.Option(8, min=1, help="Generated 10 s 360p clips."),
    workers: int = typer.Option(2, min=0, help="Decode processes."),
    as_json: bool = options.json_flag(),
):
    """Decode generated clips in one process and in a pool; run real-size backbones."""
    from avr import bench as benches

    torch_device, name = _bench_device(device)
    _print_figures("extract", name, None, benches.bench_extract(clips=clips, device=torch_device,
                                                                workers=workers), as_json)


@bench_app.command("gpu")
def bench_gpu(
    device: str = options.device(),
    out: Path = typer.Option(Path("gpu_check.json"), "--out", help="The JSON to write "
                             "(BENCHMARKS.md documents every key)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny shapes and sizes: every row in "
                               "about a minute, no figure judged (with --device cpu: CI)."),
    budget: float = typer.Option(DEFAULT_GPU_BUDGET_S, "--budget", callback=options.positive,
                                 help="Seconds the check may take; rows that would not fit "
                                      "are skipped."),
):
    """Check every head, residency and stacked sweep on the device against the CPU, then
    measure each GPU target; one JSON (--out) and one table. Exit status 1 when a correctness
    row failed."""
    from avr.gpu_check import check_output, run_gpu_check, table

    check_output(out)
    torch_device, _ = _bench_device(device)
    command = " ".join(["avr bench gpu", f"--device {device}", f"--out {out}",
                        *(["--quick"] if quick else []), f"--budget {budget:g}"])
    report = run_gpu_check(torch_device, quick=quick, budget_s=budget, out=out,
                           command=command, console=console)
    console.print(table(report))
    console.print(f"{report.summary()}; wrote {escape(str(out))}", highlight=False)
    if not report.passed:
        raise typer.Exit(1)


def _head_list(value: str) -> None:
    from avr.fuse.heads import head_class

    if not options.names(value):
        raise AvrError("name at least one head")
    for name in options.names(value):
        head_class(name)


def _array_list(value: str) -> None:
    from avr.extract.generated import check_arrays, generated_spec

    if not options.names(value):
        raise AvrError("name at least one array")
    check_arrays(generated_spec(0), options.names(value))


def _like(name: str) -> None:
    from avr.extract.generated import LIKE_DATASETS

    options.choose(name, LIKE_DATASETS)


@bench_app.command("store")
def bench_store(
    videos: Optional[int] = typer.Option(None, "--videos", min=3,
                                         help="Videos to generate (VATEX: 28,991)."),
    out: str = typer.Option(..., "--out", help="The store to write or resume: a path or a URL."),
    like: Optional[str] = typer.Option(
        None, "--like", help="Shape the store like a dataset: its split sizes (scaled to "
                             "--videos when given), its name (runs take its recipe), captions "
                             "per video, caption protocol, audio and (VATEX's backbones) frames "
                             "and text lengths: vatex | msrvtt | lsmdc | charades | didemo | "
                             "msvd | activitynet.",
        callback=options.checked(_like)),
    captions_per_video: Optional[int] = typer.Option(None, "--captions-per-video", min=1,
                                                     help="Default 10 (VATEX's)."),
    seed: int = typer.Option(0, help="Seed of the latent world."),
    arrays: Optional[str] = typer.Option(None, "--arrays", help="Write only these feature "
                                         "arrays (comma-separated); the others are recorded as "
                                         "unwritten.", callback=options.checked(_array_list)),
    heads: Optional[str] = typer.Option(None, "--heads", help="Write only the arrays these "
                                        "heads read (comma-separated, e.g. xpool,gais).",
                                        callback=options.checked(_head_list)),
    val_videos: Optional[int] = typer.Option(None, "--val-videos", min=1,
                                             help="Default: VATEX's share (1,500 of 28,991), or "
                                                  "--like's share of --videos."),
    test_videos: Optional[int] = typer.Option(None, "--test-videos", min=1,
                                              help="Default: VATEX's share (1,500 of 28,991), or "
                                                   "--like's share of --videos."),
    chunk_rows: Optional[int] = options.chunk_rows(),
    compression: str = options.compression(),
    overwrite: bool = options.overwrite(),
    shapes: str = typer.Option("vatex", "--shapes", hidden=True, callback=options.one_of("vatex", "tiny"),
                               help="tiny: the tiny backbones' widths, for tests."),
    as_json: bool = options.json_flag(),
):
    """Write a store with VATEX's per-row shapes (or a dataset's, --like) straight from a
    generator: topics, captions near their video's frames, twins only audio tells apart
    (README "Generated stores")."""
    from avr.extract.generated import GeneratorSettings, arrays_for_heads, write_generated_store

    if arrays is not None and heads is not None:
        raise typer.BadParameter("give --arrays or --heads, not both", param_hint="'--arrays'")
    chosen = (tuple(options.names(arrays)) if arrays is not None
              else arrays_for_heads(options.names(heads)) if heads is not None else None)
    common = dict(seed=seed, shapes=shapes, arrays=chosen,
                  heads=tuple(options.names(heads)) if heads is not None else None)
    if like is None:
        if videos is None:
            raise typer.BadParameter("give --videos N or --like DATASET", param_hint="'--videos'")
        settings = GeneratorSettings(videos=videos, captions_per_video=captions_per_video or 10,
                                     val_videos=val_videos, test_videos=test_videos, **common)
    else:
        if captions_per_video is not None:
            raise typer.BadParameter(f"--like {like} sets the captions of each split; leave out "
                                     f"--captions-per-video", param_hint="'--like'")
        settings = GeneratorSettings.like_dataset(like, videos, val_videos, test_videos, **common)
    summary = write_generated_store(out, settings, overwrite=overwrite, chunk_rows=chunk_rows,
                                    compression=compression, console=None if as_json else console)
    if as_json:
        options.print_json(summary)
        return
    seconds = max(summary["seconds"], 1e-9)
    console.print(f"[bold]{escape(summary['out'])}[/]: {summary['videos']:,} videos, "
                  f"{summary['captions']:,} captions; {summary['written_bytes'] / 1e9:,.2f} GB "
                  f"written ({summary['written_bytes'] / 1e6 / seconds:,.1f} MB/s), "
                  f"{summary['bytes_on_disk'] / 1e9:,.2f} GB on disk; {summary['seconds']:.1f} s")
    if summary["unwritten"]:
        console.print(f"left unwritten: {', '.join(summary['unwritten'])}", highlight=False,
                      soft_wrap=True)
