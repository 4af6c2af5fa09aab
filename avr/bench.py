"""`avr bench`: the speed of each stage on VATEX-shaped work, measured side by side with the
straightforward way of doing the same thing on the same tensors and device.

Workloads use random tensors (or random-weight backbones of real size): shapes decide the cost.
``--scale`` shrinks the row counts (not the per-row shapes) so the same script runs on a laptop
CPU; the figures in BENCHMARKS.md say which scale and device they were measured at.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avr.device import autocast
from avr.evaluate.score import score_split, score_states
from avr.fuse.heads import build_head, head_class
from avr.store import schema
from avr.store.group import create_store, open_store
from avr.store.location import store_location
from avr.store.schema import AudioParams, BackboneInfo, CacheSpec
from avr.store.splits import random_split

# VATEX with the default backbones (the HGR split; BENCHMARKS.md has the figures).
VATEX = dict(train_videos=25_991, test_videos=1_500, captions_per_video=10, frames=32)


def vatex_spec(num_frames: int = VATEX["frames"]) -> CacheSpec:
    info = BackboneInfo("bench", "random:0", "none", "0")
    return CacheSpec(dataset="bench", num_frames=num_frames, image_size=224, clip_dim=512,
                     clip_text_len=77, swin_channels=(192, 384, 768), swin_grids=(4, 2, 1),
                     ast_dim=768, roberta_dim=768, roberta_len=32,
                     backbones={k: info for k in ("clip", "swin", "ast", "roberta")},
                     audio=AudioParams())


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    note: str = ""

    def line(self) -> str:
        return f"{self.name:<48} {self.value:>12.4g} {self.unit:<10} {self.note}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs after one warm-up run."""
    fn()
    synchronize(device)
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


# ---- training -----------------------------------------------------------------------------------

def bench_train(head_name: str, *, scale: float, device: torch.device, batch_size: int = 128,
                steps: int | None = None) -> list[Figure]:
    """One epoch of ``head_name`` (one caption per video, batch 128) on GPU-resident 16-bit
    tokens, extrapolated from ``steps`` timed steps when given."""
    spec = vatex_spec()
    cls = head_class(head_name)
    videos = max(batch_size * 2, int(VATEX["train_videos"] * scale))
    data = random_split(spec, videos, 1, video_names=cls.video_inputs,
                        caption_names=cls.caption_inputs, device=device)
    head = build_head(head_name, spec).to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)
    num_steps = videos // batch_size
    timed_steps = min(num_steps, steps or num_steps)

    def epoch():
        order = torch.randperm(videos, device=device)
        for step in range(timed_steps):
            rows = order[step * batch_size:(step + 1) * batch_size]
            with autocast(device):
                loss, _ = head.loss(head.encode_texts(data.caption_rows(rows)),
                                    head.encode_videos(data.video_rows(rows)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    seconds = timed(epoch, device, repeat=2) * num_steps / timed_steps
    full = seconds * VATEX["train_videos"] / videos
    return [Figure(f"train {head_name} epoch ({videos} videos)", seconds, "s"),
            Figure(f"train {head_name} epoch, VATEX-sized", full, "s",
                   "extrapolated" if videos != VATEX["train_videos"] else "")]


def bench_train_store(store: str, head_name: str, *, device: torch.device, batch_size: int = 128,
                      steps: int | None = None, memory_budget: float | None = None,
                      resident: str = "fp16", seed: int = 0) -> list[Figure]:
    """Train ``head_name`` on the train split of ``store`` as ``avr train`` would under
    ``memory_budget`` and ``resident`` (one epoch, or its first ``steps`` batches): the
    residency plan, pairs and bytes per second, peak memory. A streamed split's whole epoch is
    also read on its own, beside a raw sequential read of the same chunk files, both from a cold
    page cache (as far as the kernel lets go of them)."""
    import resource

    from avr.fuse import trainer
    from avr.fuse.trainer import TrainConfig

    config = TrainConfig(head=head_name, epochs=1, batch_size=batch_size, lr=1e-4, seed=seed,
                         device=str(device), memory_budget=memory_budget, resident=resident)
    config.validate()
    location = store_location(store)
    config, _ = trainer.schedule_for_store(location, config)  # the rest as the head's recipe
    start = time.perf_counter()
    cache = trainer.load_cache(location, head_name, device, config=config)
    load_seconds = time.perf_counter() - start
    plan, train = cache.plan, cache.train
    figures = [Figure(f"plan: train {plan.train.mode}, val {plan.val.mode}",
                      plan.train.bytes / 1e9, "GB", plan.describe()),
               Figure("load (plan, row index, resident arrays)", load_seconds, "s")]
    pair_bytes = _pair_bytes(location, head_name)
    if plan.train.mode == "streamed":
        files = _chunk_files(location, train)
        if files:
            on_disk = sum(f.stat().st_size for f in files)
            _drop_page_cache(*files)
            seconds, pairs = _read_stream(train, config)
            _drop_page_cache(*files)
            raw = _read_files(files)
            figures += [
                Figure("stream read alone (no training)", on_disk / 1e6 / seconds,
                       "MB/s", f"of {on_disk / 1e6:.1f} MB of stored chunks: {pairs} pairs, "
                       f"{pairs / seconds:.0f} pairs/s, "
                       f"{pairs * pair_bytes / 1e6 / seconds:.1f} MB/s decoded"),
                Figure("raw sequential read of the same chunk files", on_disk / 1e6 / raw,
                       "MB/s", f"the stream reaches {100 * raw / seconds:.0f}% of it")]
    run = trainer.build_run(config, cache, device)
    # the process's times and page faults when training starts, before each optimizer step
    # (the step's data, forward and backward are done) and at the end
    marks = [resource.getrusage(resource.RUSAGE_SELF)]
    hook = run.state.optimizer.register_step_pre_hook(
        lambda *_: marks.append(resource.getrusage(resource.RUSAGE_SELF)))
    start = time.perf_counter()
    _, _, pairs = trainer.train_epoch(run, 0, max_batches=steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    hook.remove()
    marks.append(resource.getrusage(resource.RUSAGE_SELF))
    batches = max(1, math.ceil(pairs / batch_size))
    figures += [Figure(f"train {head_name}: {pairs} pairs", pairs / seconds, "pairs/s",
                       f"{pairs * pair_bytes / 1e6 / seconds:.1f} MB/s of rows trained on "
                       f"(16-bit), {seconds:.1f} s, {seconds / batches:.2f} s a step"),
                *_step_usage(marks),
                Figure("peak resident memory (RSS) of this process",
                       marks[-1].ru_maxrss * 1024 / 1e9, "GB")]  # KiB on Linux
    if device.type == "cuda":
        figures.append(Figure("peak GPU memory allocated",
                              torch.cuda.max_memory_allocated(device) / 1e9, "GB"))
    return figures


def _step_usage(marks: list) -> list[Figure]:
    """Minor page faults and system and user CPU seconds of the first training step and of each
    later one (from one optimizer step to the next), from ``getrusage`` marks taken at the start,
    before each optimizer step and at the end: the first step also maps the memory the later
    ones may reuse."""
    def usage(first, last, steps: int) -> tuple[float, float, float]:
        return ((last.ru_minflt - first.ru_minflt) / steps,
                (last.ru_stime - first.ru_stime) / steps, (last.ru_utime - first.ru_utime) / steps)

    spans = [("the first step", marks[0], marks[1], 1)]
    if len(marks) > 3:
        spans.append((f"each of the {len(marks) - 3} steps after it", marks[1], marks[-2],
                      len(marks) - 3))
    figures = []
    for what, first, last, steps in spans:
        faults, system, user = usage(first, last, steps)
        figures += [Figure(f"minor page faults, {what}", faults, "faults"),
                    Figure(f"CPU time, {what}: system", system, "s", f"user {user:.2f} s")]
    return figures


def _pair_bytes(location, head_name: str) -> int:
    """Bytes (16-bit, as stored) of one train pair of ``head_name``: a video's rows of the arrays
    it reads and a caption's, as the residency plan counts them."""
    from avr.fuse.heads import video_inputs
    from avr.fuse.residency.plan import StoreSizes

    group, _ = open_store(location)
    sizes = StoreSizes(group, video_inputs(head_name), head_class(head_name).caption_inputs,
                       "fp16")
    return sizes.video_row16 + sizes.caption_row16


def _read_stream(train, config) -> tuple[float, int]:
    """Seconds and pairs of reading a whole epoch of a streamed split (every chunk it holds,
    as the raw read beside it), rows assembled into batches but not trained on."""
    start = time.perf_counter()
    pairs = sum(sum(counts) for _, _, counts in train.batches(config, 0))
    return time.perf_counter() - start, pairs


def _chunk_files(location, train) -> list[Path]:
    """The chunk files of a local store that a streamed train split reads (every chunk of its
    arrays that holds train rows); empty for a store at a URL."""
    root = Path(str(location))
    if not root.is_dir():
        return []
    group, _ = open_store(location)
    files = []
    for names, rows in ((train.video_names, train.video_store_rows),
                        (train.caption_names, train.caption_store_rows)):
        for name in names:
            array = group[name]
            chunks = {int(c) for c in np.unique(np.asarray(rows) // array.chunks[0])}
            folder = root / name / "c"
            files += [f for f in sorted(folder.rglob("*")) if f.is_file()
                      and int(f.relative_to(folder).parts[0]) in chunks]
    return files


def _read_files(files: list[Path], block: int = 16 << 20) -> float:
    """Seconds to read ``files`` one after another, in blocks."""
    start = time.perf_counter()
    for file in files:
        with file.open("rb", buffering=0) as handle:
            while handle.read(block):
                pass
    return time.perf_counter() - start


# ---- evaluation ---------------------------------------------------------------------------------

def bench_eval(head_name: str, *, scale: float, device: torch.device,
               reference_pairs: int = 2_000) -> list[Figure]:
    """Score every (caption, video) pair of a VATEX-shaped test split with ``score_states``,
    against the straightforward per-pair loop that reference implementations run."""
    spec = vatex_spec()
    cls = head_class(head_name)
    videos = max(8, int(VATEX["test_videos"] * scale))
    data = random_split(spec, videos, VATEX["captions_per_video"], video_names=cls.video_inputs,
                        caption_names=cls.caption_inputs, device=device)
    head = build_head(head_name, spec).to(device).eval()
    captions = data.num_captions
    states = score_split(head, data.videos, data.captions, device, out_device=device)
    texts, encoded_videos = states.texts, states.videos
    with torch.no_grad(), autocast(device):
        seconds = timed(lambda: score_states(head, texts, encoded_videos, out_device=device),
                        device, repeat=2)
        pairs = min(reference_pairs, captions * videos)

        def per_pair():
            for p in range(pairs):
                q, v = p % captions, p // captions % videos
                head.score({k: t[q:q + 1] for k, t in texts.items()},
                           {k: t[v:v + 1] for k, t in encoded_videos.items()})

        loop = timed(per_pair, device, repeat=1) * captions * videos / pairs
    full = seconds * (VATEX["test_videos"] / videos) ** 2
    return [Figure(f"eval {head_name}: {captions}x{videos} pairs, chunked", seconds, "s"),
            Figure(f"eval {head_name}: same, one pair at a time", loop, "s",
                   f"extrapolated from {pairs} pairs; ratio {loop / seconds:.0f}x"),
            Figure(f"eval {head_name}: 15000x1500, chunked", full, "s",
                   "extrapolated" if videos != VATEX["test_videos"] else "")]


# ---- cache reads --------------------------------------------------------------------------------

def bench_cache(*, gigabytes: float, device: torch.device, workdir: Path | None = None,
                store: str | Path | None = None) -> list[Figure]:
    """Read the audio tokens of a store into ``device`` memory, against reading the same bytes
    from one raw file. With ``store`` (a path or a URL), read that store's train split instead:
    the speed of the disk or object store it lives on."""
    if store is not None:
        seconds, nbytes, videos = _read_train_audio(store, device)
        return [Figure(f"cache read {nbytes / 1e9:.2f} GB {store} -> {device.type}",
                       nbytes / seconds / 1e9, "GB/s", f"{videos} train videos")]
    spec = vatex_spec()
    row_bytes = spec.ast_patches * spec.ast_dim * 2
    rows = max(8, int(gigabytes * 1e9 / row_bytes))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        generated = Path(tmp) / "cache"
        group = create_store(generated, spec, [f"v{i}" for i in range(rows)],
                                    ["train"] * rows,
                                    np.arange(rows), [f"c{i}" for i in range(rows)])
        chunk = group[schema.AUDIO_PATCH_TOKENS].chunks[0]
        rng = np.random.default_rng(0)
        block = rng.standard_normal((chunk, spec.ast_patches, spec.ast_dim)).astype(np.float16)
        raw = Path(tmp) / "raw.bin"
        with raw.open("wb") as handle:
            for start in range(0, rows, chunk):
                stop = min(rows, start + chunk)
                group[schema.AUDIO_PATCH_TOKENS][start:stop] = block[:stop - start]
                handle.write(block[:stop - start].tobytes())
        group[schema.VIDEO_DONE][:] = True
        nbytes = rows * row_bytes
        _drop_page_cache(raw, generated)
        zarr_s, _, _ = _read_train_audio(generated, device)
        _drop_page_cache(raw, generated)
        start = time.perf_counter()
        array = np.fromfile(raw, dtype=np.float16)
        torch.from_numpy(array).to(device)
        synchronize(device)
        raw_s = time.perf_counter() - start
    return [Figure(f"cache read {nbytes / 1e9:.2f} GB zarr -> {device.type}", nbytes / zarr_s / 1e9,
                   "GB/s"),
            Figure(f"cache read {nbytes / 1e9:.2f} GB raw file -> {device.type}",
                   nbytes / raw_s / 1e9, "GB/s", f"zarr reaches {100 * raw_s / zarr_s:.0f}%")]


def _read_train_audio(store: str | Path, device: torch.device) -> tuple[float, int, int]:
    """Seconds to read the train split's audio tokens of ``store`` into ``device`` memory,
    their bytes and the number of videos."""
    from avr.store.splits import load_split

    start = time.perf_counter()
    data = load_split(store, "train", (schema.AUDIO_PATCH_TOKENS,), ())
    tokens = data.videos[schema.AUDIO_PATCH_TOKENS].to(device)
    synchronize(device)
    return time.perf_counter() - start, tokens.numel() * tokens.element_size(), tokens.shape[0]


def _drop_page_cache(*paths: Path) -> None:
    """Ask the kernel to forget the files' pages so both reads start cold (best effort)."""
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            with file.open("rb") as handle:
                try:
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                except (AttributeError, OSError):
                    return


# ---- extraction ---------------------------------------------------------------------------------

def bench_extract(*, clips: int, device: torch.device, workers: int, seconds: float = 10.0,
                  backbones: str = "real-size") -> list[Figure]:
    """Decode generated 10 s 360p clips with stereo 44.1 kHz audio, one process against a pool,
    and run the backbones (random weights at real size, or tiny) on the decoded batch."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from avr.extract.decode import decode_clip

    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_bench_clip(Path(tmp) / f"clip{i}.mp4", seconds, seed=i) for i in range(clips)]
        audio = AudioParams()
        start = time.perf_counter()
        decoded = [decode_clip(p, VATEX["frames"], 224, audio) for p in paths]
        single = clips / (time.perf_counter() - start)
        figures.append(Figure("decode, one process", single, "clips/s"))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(decode_clip, paths[:workers], [VATEX["frames"]] * workers,
                          [224] * workers, [audio] * workers))  # start the workers
            start = time.perf_counter()
            list(pool.map(decode_clip, paths, [VATEX["frames"]] * clips, [224] * clips,
                          [audio] * clips))
            pooled = clips / (time.perf_counter() - start)
        figures.append(Figure(f"decode, {workers} worker processes", pooled, "clips/s",
                              f"{100 * pooled / (single * workers):.0f}% of single x workers"))
    models = real_size_backbones(device) if backbones == "real-size" else None
    if models is not None:
        frames = torch.from_numpy(np.stack([d.frames for d in decoded]))
        fbank = torch.from_numpy(np.stack([d.fbank for d in decoded]))
        texts = ["a man is playing a guitar on a stage while people cheer"] * (10 * clips)

        def run():
            models.encode_frames(frames.flatten(0, 1).to(device))
            models.encode_audio(fbank.to(device))
            models.encode_text(texts)

        seconds_per_batch = timed(run, device, repeat=1)
        figures.append(Figure("backbones (ViT-B/32, Swin-T, AST, RoBERTa) ", clips /
                              seconds_per_batch, "clips/s", "32 frames + audio + 10 captions"))
    return figures


def real_size_backbones(device: torch.device):
    """ViT-B/32, Swin-T, AST base and RoBERTa base with random weights, built from their
    configs (no download): the compute of the real models."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import (ASTConfig, ASTModel, RobertaConfig, RobertaModel, SwinConfig,
                              SwinModel)
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from avr.extract.backbones import Backbones, HashWordTokenizer

    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    swin = SwinModel(SwinConfig(), add_pooling_layer=False)
    ast = ASTModel(ASTConfig(max_length=1024, num_mel_bins=128))
    roberta = RobertaModel(RobertaConfig(vocab_size=50265), add_pooling_layer=False)
    info = BackboneInfo("bench", "random:0", "none", "0")
    return Backbones(clip=clip, clip_tokenizer=SimpleTokenizer(context_length=77), swin=swin,
                     swin_mean=IMAGENET_DEFAULT_MEAN, swin_std=IMAGENET_DEFAULT_STD, ast=ast,
                     roberta=roberta, roberta_tokenizer=HashWordTokenizer(50265, 32),
                     roberta_len=32, swin_stages=(1, 2, 3), swin_grids=(4, 2, 1),
                     infos={k: info for k in ("clip", "swin", "ast", "roberta")},
                     device=device, amp=True)


def write_bench_clip(path: Path, seconds: float, seed: int) -> Path:
    """A 640x360 H.264 clip at 25 fps with stereo 44.1 kHz AAC: moving noise blocks and tones."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 640, 360, "yuv420p"
        audio = container.add_stream("aac", rate=44_100, layout="stereo")
        base = rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)
        for i in range(int(seconds * 25)):
            frame = np.roll(base, 8 * i, axis=1)
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        t = np.arange(int(seconds * 44_100)) / 44_100
        tone = (0.3 * np.sin(2 * np.pi * (220 + 50 * seed) * t)).astype(np.float32)
        samples = np.stack([tone, tone[::-1]])
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start:start + 1024], format="fltp",
                                               layout="stereo")
            frame.sample_rate = 44_100
            for packet in audio.encode(frame):
                container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode():
                container.mux(packet)
    return path
