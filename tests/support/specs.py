"""A tiny cache spec whose shapes follow the real layout at small widths."""

from __future__ import annotations

from avr.store.schema import AudioParams, BackboneInfo, CacheSpec


def make_tiny_spec(**overrides) -> CacheSpec:
    values = dict(
        dataset="unit",
        num_frames=6,
        image_size=32,
        clip_dim=32,
        clip_text_len=12,
        swin_channels=(8, 16, 32),
        swin_grids=(4, 2, 1),
        ast_dim=24,
        roberta_dim=24,
        roberta_len=12,
        backbones={
            "clip": BackboneInfo("tiny-clip", "random:0", "open_clip", "0"),
            "swin": BackboneInfo("tiny-swin", "random:0", "transformers", "0"),
            "ast": BackboneInfo("tiny-ast", "random:0", "transformers", "0"),
            "roberta": BackboneInfo("tiny-roberta", "random:0", "transformers", "0"),
        },
        audio=AudioParams(),
        audio_pooled_token=True,  # as `avr extract` writes stores now
    )
    values.update(overrides)
    return CacheSpec(**values)
