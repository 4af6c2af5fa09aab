"""`avr extract`: a dataset's media through the frozen backbones into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from avr.cli import _options as options
from avr.cli._app import app, console


def _dataset(name: str) -> None:
    from avr.extract.datasets import layout_of

    layout_of(name)


@app.command()
def extract(
    dataset: str = typer.Option("vatex", help="vatex | msrvtt | lsmdc | charades | didemo | "
                                "msvd | activitynet | generic | demo.",
                                callback=options.checked(_dataset)),
    root: Optional[Path] = typer.Option(None, help="Dataset files (default data/<dataset>/)."),
    videos_dir: Optional[Path] = typer.Option(
        None, "--videos-dir", help="The folder of the videos, relative to --root or absolute "
                                   "(default: the folders the dataset's releases use, e.g. "
                                   "videos/, vids/, MSRVTT_Videos/)."),
    show_layout: bool = typer.Option(False, "--show-layout",
                                     help="Print the files the dataset expects under --root."),
    out: str = typer.Option("cache", "--out", "--cache", help="The Zarr store to write or "
                                                              "resume: a path or a URL "
                                                              "(s3://bucket/cache, "
                                                              "file:///data/cache); --cache is "
                                                              "the same option, as train and "
                                                              "eval name the store."),
    backbones: str = typer.Option("real", help="real (pretrained weights) | tiny (small random "
                                               "configs of the same classes, for tests/demo).",
                                  callback=options.one_of("real", "tiny")),
    clip_model: str = typer.Option("ViT-B-32", "--clip-model", help="open_clip model name."),
    clip_pretrained: str = typer.Option("openai", "--clip-pretrained",
                                        help="open_clip pretrained tag or a local checkpoint."),
    swin: str = typer.Option("microsoft/swin-tiny-patch4-window7-224",
                             help="Swin: HF model id or local directory."),
    ast: str = typer.Option("MIT/ast-finetuned-audioset-10-10-0.4593",
                            help="AST: HF model id or local directory."),
    roberta: str = typer.Option("roberta-base", help="RoBERTa: HF model id or local directory."),
    clip_text_tokens: Optional[int] = typer.Option(
        None, "--clip-text-tokens", min=1, help="CLIP text tokens kept per caption (default 32; "
                                                "77, CLIP's whole context, for paragraphs)."),
    roberta_text_tokens: Optional[int] = typer.Option(
        None, "--roberta-text-tokens", min=1, max=512,
        help="RoBERTa tokens kept per caption (default 32; 256 for paragraphs)."),
    frames: Optional[int] = typer.Option(None, "--frames", min=1,
                                         help="Frames per video (default: the dataset's; 12 "
                                              "msrvtt, lsmdc, msvd; 32 vatex, charades; 64 "
                                              "didemo, activitynet; --show-layout says)."),
    device: str = options.device(),
    workers: Optional[int] = typer.Option(None, min=0,
                                          help="Decode processes (0: in this process); "
                                               "a dask worker decodes its own chunks."),
    chunk_rows: Optional[int] = options.chunk_rows(),
    compression: str = options.compression(),
    overwrite: bool = options.overwrite(),
    seed: int = typer.Option(0, help="Seed of tiny backbones and of the demo clips."),
    option: list[str] = options.opts("Dataset option key=value (msrvtt: train=7k, val_size=500; "
                                     "didemo: captions=moments; lsmdc: captions=all; "
                                     "--show-layout lists them)."),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="Run the chunks on this dask scheduler's workers "
                                  "(tcp://HOST:PORT); --out and --root must be reachable from "
                                  "every worker at the same paths."),
    dask_workers: Optional[int] = typer.Option(
        None, "--dask-workers", min=1, help="Run the chunks on a local dask cluster of N worker "
                                     "processes (one thread each)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout "
                                 "(no progress): videos done, failures, bytes, seconds."),
):
    """Decode a dataset, run the frozen backbones once, write every token to a Zarr store."""
    from avr.extract.datasets import layout_of

    if show_layout:
        console.print(layout_of(dataset), markup=False, highlight=False, soft_wrap=True)
        return
    from avr.extract.backbones import BackboneNames
    from avr.extract.pipeline import ExtractConfig, extract as run_extract
    from avr.fuse.config import parse_options

    config = ExtractConfig(
        dataset=dataset, root=root, videos_dir=videos_dir, out=out, weights=backbones,
        names=BackboneNames(clip_model=clip_model, clip_pretrained=clip_pretrained, swin=swin,
                            ast=ast, roberta=roberta, clip_text_tokens=clip_text_tokens,
                            roberta_text_tokens=roberta_text_tokens),
        num_frames=frames, device=device, workers=workers, chunk_rows=chunk_rows,
        compression=compression, overwrite=overwrite, seed=seed,
        dataset_options=parse_options(option))
    shown = None if as_json else console
    if scheduler is None and dask_workers is None:
        summary = run_extract(config, console=shown)
    else:
        from avr.extract.distributed import dask_client, extract_on_dask

        with dask_client(scheduler, dask_workers) as client:
            summary = extract_on_dask(config, client, console=shown)
    if as_json:
        from dataclasses import asdict

        options.print_json({**asdict(summary), "out": str(summary.out),
                            "clips_per_s": summary.clips_per_s})
        return
    _print_extract_summary(summary)


def _print_extract_summary(summary) -> None:
    failed = len(summary.failures)
    console.print(
        f"[bold]{summary.out}[/]: {summary.done}/{summary.videos} videos done "
        f"({summary.done_now} now, {failed} failed), {summary.captions} captions, "
        f"{summary.bytes_on_disk / 1e6:,.1f} MB; {summary.seconds:.1f} s "
        f"({summary.clips_per_s:.1f} clips/s; decode {summary.decode_seconds:.1f} s over workers, "
        f"backbones {summary.encode_seconds:.1f} s on {summary.device})")
    for failure in summary.failures[:10]:
        console.print(f"  [red]failed[/] {failure.video_id}: {failure.reason} ({failure.path})")
    if failed > 10:
        console.print(f"  ... {failed - 10} more in {summary.out}/failures.jsonl")
