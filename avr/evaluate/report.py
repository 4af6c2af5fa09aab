"""`avr eval --report DIR`: a markdown report with the plots people would rather see than read:
recall at K, the attention of sample captions over frames and audio, gate and threshold values,
and a soft-DTW alignment path. Each plot is drawn only when the head explains that quantity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avr.evaluate import metrics
from avr.fuse.heads import base


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_captions(caption_video: np.ndarray, caption_tags: list[str], count: int = 4
                    ) -> list[int]:
    """A few caption rows with a video: tagged ones first (the demo's audio-only captions)."""
    usable = [j for j in range(len(caption_video)) if caption_video[j] >= 0]
    tagged = [j for j in usable if caption_tags and caption_tags[j]]
    untagged = [j for j in usable if not (caption_tags and caption_tags[j])]
    picked = tagged[:count // 2] + untagged[:count - min(len(tagged), count // 2)]
    return sorted(picked[:count])


def plot_recall_curves(result, path: Path) -> Path:
    plt = _pyplot()
    max_k = min(50, result.num_videos)
    ks = np.arange(1, max_k + 1)
    t2v = metrics.recall_at_k_curve(metrics.t2v_ranks(result.sim, result.caption_video), max_k)
    v2t = metrics.recall_at_k_curve(
        metrics.v2t_ranks(result.sim, result.caption_video, result.num_videos), max_k)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, t2v, label="text -> video")
    ax.plot(ks, v2t, label="video -> text")
    ax.plot(ks, 100.0 * ks / result.num_videos, "--", color="grey", label="chance")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_title(f"{result.head} on {result.split}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rows(values: np.ndarray, labels: list[str], path: Path, title: str, xlabel: str) -> Path:
    """One heat-map row per sample caption (attention over audio steps, gates), each labelled
    with its caption, wrapped so that no label or title is cut."""
    plt = _pyplot()
    values = values.reshape(values.shape[0], -1)
    fig, ax = plt.subplots(figsize=(10, 0.75 * len(labels) + 1.6), layout="constrained")
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([_wrapped(label, 45) for label in labels], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frame_attention(values: np.ndarray, labels: list[str], path: Path,
                         strips: list[tuple[list[np.ndarray], np.ndarray] | None]) -> Path:
    """Attention over frames, one panel per sample caption: bars over the frames, and under
    them the thumbnails of the caption's video at the frames they show (``strips``: tiles and
    frame indices per caption, None where the store has no thumbnails)."""
    plt = _pyplot()
    ratios = [r for strip in strips for r in ((2.0, 0.8) if strip else (2.0,))]
    fig = plt.figure(figsize=(8, 0.9 * sum(ratios) + 0.6), layout="constrained")
    axes = iter(fig.subplots(len(ratios), 1, squeeze=False,
                             gridspec_kw={"height_ratios": ratios})[:, 0])
    for weights, label, strip in zip(values, labels, strips):
        ax = next(axes)
        ax.bar(np.arange(len(weights)), weights, color="tab:blue")
        ax.set_xlim(-0.5, len(weights) - 0.5)
        ax.set_title(_wrapped(label, 100), fontsize=8)
        ax.tick_params(labelsize=7)
        if strip:
            _draw_tiles(next(axes), strip[0], strip[1], len(weights))
    fig.suptitle("attention over frames")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_audio_grid(values: np.ndarray, labels: list[str], grid: tuple[int, int], path: Path
                    ) -> Path:
    """Attention over AST patch tokens drawn on their frequency x time grid, one panel per
    caption: a caption about a low hum should light the low-frequency rows."""
    plt = _pyplot()
    freq, steps = grid
    fig, axes = plt.subplots(len(labels), 1, figsize=(7, 1.5 * len(labels) + 0.6),
                             squeeze=False, layout="constrained")
    for ax, row, label in zip(axes[:, 0], values, labels):
        ax.imshow(row.reshape(freq, steps), aspect="auto", origin="lower", cmap="viridis",
                  interpolation="nearest")
        ax.set_title(_wrapped(label, 100), fontsize=8)
        ax.set_ylabel("freq", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[-1, 0].set_xlabel("audio time step")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_alignment(alignment: np.ndarray, label: str, path: Path, tokens: list[str]) -> Path:
    """A soft-DTW expected alignment [text tokens, audio steps] with its arg-max path, its rows
    labelled with the caption's tokens (the padding rows beyond them left out)."""
    plt = _pyplot()
    alignment = alignment[:len(tokens)]
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(tokens) + 1.6), layout="constrained")
    image = ax.imshow(alignment, aspect="auto", cmap="magma", interpolation="nearest",
                      origin="lower")
    ax.plot(alignment.argmax(1), np.arange(alignment.shape[0]), "c.", markersize=4)
    ax.set_yticks(range(len(tokens)))
    ax.set_yticklabels(tokens, fontsize=7)
    ax.set_xlabel("audio step")
    ax.set_ylabel("caption token")
    ax.set_title(f"soft-DTW alignment: {_wrapped(label, 90)}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def caption_tokens(spec, text: str, count: int) -> list[str]:
    """The RoBERTa tokens of ``text`` as its store cut them (the text rows of HTAV's alignment):
    the tiny backbones' words between <s> and </s>; a pretrained tokenizer from the local cache;
    else the token positions."""
    from avr.extract.backbones import HashWordTokenizer

    roberta = spec.backbones["roberta"]
    if roberta.weights.startswith("random:"):
        tokens = ["<s>", *HashWordTokenizer.words(text)[:count - 2], "</s>"]
    else:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(roberta.name, local_files_only=True)
            tokens = tokenizer.convert_ids_to_tokens(
                tokenizer(text, truncation=True, max_length=count)["input_ids"])
        except Exception:  # no local copy of the tokenizer (a generated store): positions
            tokens = [str(i) for i in range(count)]
    return tokens[:count]


def plot_pair(explained: dict[str, np.ndarray], path: Path, title: str, *,
              tiles: list[np.ndarray] | None = None, tile_frames: np.ndarray | None = None,
              audio_grid: tuple[int, int] = (12, 101)) -> Path:
    """One (caption, video) pair as the head explains it (``explained``: its entries for that
    pair, without the pair axis): attention over frames as bars with the thumbnail ``tiles``
    under the frames ``tile_frames`` they show, attention over audio (on AST's frequency x time
    grid when it has that size), gates and thresholds written as values."""
    plt = _pyplot()
    frames = explained.get(base.EXPLAIN_FRAME_ATTENTION)
    audio = explained.get(base.EXPLAIN_AUDIO_ATTENTION)
    rows = [("frames", 2.0)] * (frames is not None) + [("tiles", 0.9)] * (
        frames is not None and bool(tiles)) + [("audio", 1.6)] * (audio is not None)
    fig = plt.figure(figsize=(6.4, 0.9 + sum(h for _, h in rows)), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [h for _, h in rows]})[:, 0] if rows else []
    panels = dict(zip((name for name, _ in rows), axes))
    if frames is not None:
        ax = panels["frames"]
        ax.bar(np.arange(len(frames)), frames, color="tab:blue")
        ax.set_xlim(-0.5, len(frames) - 0.5)
        ax.set_ylabel("weight", fontsize=8)
        ax.set_title("attention over frames", fontsize=9)
        ax.tick_params(labelsize=7)
        if "tiles" in panels:
            _draw_tiles(panels["tiles"], tiles, tile_frames, len(frames))
    if audio is not None:
        ax = panels["audio"]
        if audio.size == np.prod(audio_grid):
            ax.imshow(audio.reshape(audio_grid), aspect="auto", origin="lower", cmap="viridis",
                      interpolation="nearest")
            ax.set_ylabel("freq", fontsize=8)
        else:
            ax.plot(np.arange(audio.size), audio.reshape(-1), color="tab:orange")
            ax.set_ylabel("weight", fontsize=8)
        ax.set_xlabel("audio step", fontsize=8)
        ax.set_title("attention over audio", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("\n".join([_wrapped(title, 80), *pair_values(explained)]), fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def pair_values(explained: dict[str, np.ndarray]) -> list[str]:
    """The values a pair's explanation holds as numbers, not pictures: the mean audio gate and
    HTAV's learned threshold."""
    lines = []
    if base.EXPLAIN_AUDIO_GATE in explained:
        gates = np.asarray(explained[base.EXPLAIN_AUDIO_GATE]).reshape(-1)
        lines.append(f"audio gate {gates.mean():.3f} (mean of {gates.size}; "
                     f"{gates.min():.3f} to {gates.max():.3f})")
    if base.EXPLAIN_THRESHOLD in explained:
        lines.append(f"audio threshold {np.asarray(explained[base.EXPLAIN_THRESHOLD]).mean():.3f}")
    return lines


def _draw_tiles(ax, tiles: list[np.ndarray], tile_frames: np.ndarray, num_frames: int) -> None:
    """The thumbnails under the frame axis, each centred on the frame it shows."""
    for tile, frame in zip(tiles, tile_frames):
        ax.imshow(tile, extent=(frame - 0.45, frame + 0.45, 0, 1), interpolation="nearest")
    ax.set_xlim(-0.5, num_frames - 0.5)
    ax.set_ylim(0, 1)
    ax.set_aspect("auto")
    ax.set_yticks([])
    ax.set_xlabel("frame", fontsize=8)
    ax.tick_params(labelsize=7)


def _wrapped(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3]) or text


def write_report(result, explanations: dict[str, np.ndarray], captions: list[str],
                 out_dir: str | Path, spec=None,
                 strips: list[tuple[list[np.ndarray], np.ndarray] | None] | None = None) -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir``; returns the markdown path.
    ``spec`` (the store's CacheSpec) gives AST's (frequency, time) patch grid and the caption
    tokens of the alignment plot; ``strips`` the thumbnails of each caption's video."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    audio_grid = (spec.ast_freq_patches, spec.ast_time_patches) if spec else (12, 101)
    lines = [f"# {result.head} on {result.split} ({result.cache})", "",
             f"run: `{result.run_dir}`; {result.num_captions} captions x {result.num_videos} "
             f"videos; modalities `{result.modalities}`; ties: {metrics.DEFAULT_TIES}", ""]
    if result.missing_videos:
        lines += [f"{len(result.missing_videos)} videos failed extraction; their captions count "
                  "as failed queries.", ""]
    lines += ["| | R@1 | R@5 | R@10 | MdR | MnR |", "|---|---|---|---|---|---|"]
    rows = [(direction, result.metrics[direction]) for direction in ("t2v", "v2t")]
    rows += [(f"{name} {d}", m[d]) for name, m in result.variants.items() for d in m]
    rows += [(f"t2v [{tag}]", m["t2v"]) for tag, m in result.tags.items()]
    for name, m in rows:
        lines.append(f"| {name} | {m['R1']:.1f} | {m['R5']:.1f} | {m['R10']:.1f} | "
                     f"{m['MdR']:.1f} | {m['MnR']:.1f} |")
    lines.append("")
    lines += [f"![recall at K]({plot_recall_curves(result, out_dir / 'recall_at_k.png').name})",
              ""]
    if base.EXPLAIN_FRAME_ATTENTION in explanations:
        plot_frame_attention(explanations[base.EXPLAIN_FRAME_ATTENTION], captions,
                             out_dir / "frame_attention.png", strips or [None] * len(captions))
        lines += ["## attention over frames", "",
                  "![attention over frames](frame_attention.png)", ""]
    plots = [
        (base.EXPLAIN_AUDIO_ATTENTION, "audio_attention.png", "attention over audio",
         "audio step"),
        (base.EXPLAIN_AUDIO_GATE, "audio_gate.png", "audio gate values", "gate"),
    ]
    for key, file, title, xlabel in plots:
        if key not in explanations:
            continue
        values = explanations[key]
        if key == base.EXPLAIN_AUDIO_ATTENTION and values.shape[-1] == np.prod(audio_grid):
            plot_audio_grid(values, captions, audio_grid, out_dir / file)
        else:
            plot_rows(values, captions, out_dir / file, title, xlabel)
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    if base.EXPLAIN_THRESHOLD in explanations:
        threshold = explanations[base.EXPLAIN_THRESHOLD].reshape(-1)
        lines += ["## thresholded audio attention", "",
                  f"learned audio threshold theta = {threshold.mean():.4f}"
                  + ("" if np.ptp(threshold) == 0 else
                     f" (from {threshold.min():.4f} to {threshold.max():.4f})"), ""]
    if base.EXPLAIN_DTW_ALIGNMENT in explanations:
        alignment = explanations[base.EXPLAIN_DTW_ALIGNMENT][0]
        tokens = (caption_tokens(spec, captions[0], alignment.shape[0]) if spec else
                  [str(i) for i in range(alignment.shape[0])])
        plot_alignment(alignment, captions[0], out_dir / "dtw_alignment.png", tokens)
        lines += ["## soft-DTW alignment", "", "![soft-DTW alignment](dtw_alignment.png)", ""]
    lines += ["## sample captions", ""] + [f"{i}. {text}" for i, text in enumerate(captions, 1)]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
