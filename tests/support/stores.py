"""Small stores with a known answer, written through avr.store like a real extract would."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avr.store import schema
from avr.store.group import create_store
from avr.store.schema import CacheSpec


def make_learnable_store(path: Path, spec: CacheSpec, *, n_train: int = 48, n_val: int = 12,
                         n_test: int = 12, captions_per_video: int = 2, noise: float = 0.3,
                         seed: int = 0, failed: tuple[int, ...] = (),
                         video_chunk_rows: int | None = None) -> Path:
    """Every caption embedding is a fixed linear map of its video's mean frame plus noise, so a
    head with a learnable projection can retrieve far above chance; audio and Swin arrays are
    random but present. Rows in ``failed`` are left not done, as a failed extraction leaves them."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    caption_video = np.repeat(np.arange(n), captions_per_video)
    m = len(caption_video)
    group = create_store(path, spec, [f"video{i:04d}" for i in range(n)], splits,
                                caption_video, [f"caption {j} of video {j // captions_per_video}"
                                                for j in range(m)],
                                video_chunk_rows=video_chunk_rows)
    layout = schema.array_layout(spec, n, m, video_chunk_rows=video_chunk_rows)

    def randn(name):
        return rng.normal(size=layout[name].shape).astype(np.float16)

    frames = randn(schema.FRAME_EMBEDDINGS)
    mixing = rng.normal(size=(spec.clip_dim, spec.clip_dim)) / np.sqrt(spec.clip_dim)
    text = frames.astype(np.float32).mean(1)[caption_video] @ mixing
    text += noise * rng.normal(size=text.shape) * text.std()
    for name, spec_ in layout.items():
        if name in (schema.VIDEO_ID, schema.VIDEO_SPLIT, schema.CAPTION_VIDEO, schema.CAPTION_TEXT,
                    schema.CAPTION_TAG):
            continue
        if spec_.dtype == np.bool_:
            group[name][:] = True
        else:
            group[name][:] = randn(name)
    group[schema.FRAME_EMBEDDINGS][:] = frames
    group[schema.TEXT_EMBEDDINGS][:] = text.astype(np.float16)
    done = np.ones(n, dtype=bool)
    done[list(failed)] = False
    group[schema.VIDEO_DONE][:] = done
    return path
