"""int8 per-token absmax residency: fidelity on generated tokens, bytes, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avr.extract.generated import (GeneratedEncoder, GeneratorSettings, Vocabulary,
                                   generated_spec, make_plan)
from avr.store import schema
from avr.store.quantize import cosine_fidelity, quantize


@pytest.fixture(scope="module")
def tokens() -> dict[str, torch.Tensor]:
    """fp16 audio patch and frame tokens of 8 generated videos at VATEX's widths (768, 512)."""
    settings = GeneratorSettings(videos=8, val_videos=1, test_videos=1)
    spec = generated_spec(0)
    plan = make_plan(settings)
    out = GeneratedEncoder(spec, 0).encode_videos(
        plan, Vocabulary(8, 0), np.arange(8),
        (schema.AUDIO_PATCH_TOKENS, schema.FRAME_EMBEDDINGS))
    return {name: value.half() for name, value in out.items()}


@pytest.mark.parametrize("name", [schema.AUDIO_PATCH_TOKENS, schema.FRAME_EMBEDDINGS])
def test_int8_tokens_keep_their_direction_in_about_half_the_bytes(tokens, name):
    x = tokens[name]
    q = quantize(x)
    assert q.values.dtype == torch.int8 and q.scales.dtype == torch.float16
    assert q.values.shape == x.shape and q.scales.shape == (*x.shape[:-1], 1)
    fidelity = cosine_fidelity(x, q)
    assert fidelity["bytes_vs_fp16"] == pytest.approx(0.5 + 1 / x.shape[-1])
    assert fidelity["cosine_mean"] > 0.9999 and fidelity["cosine_min"] > 0.999, fidelity
    # the worst component error is half a step of that token's scale
    error = (q.dequantize(torch.float32) - x.float()).abs()
    assert bool((error <= 0.5 * q.scales.float() + 1e-3 * x.float().abs()).all())


def test_rows_move_quantized_and_dequantize_alike(tokens):
    q = quantize(tokens[schema.FRAME_EMBEDDINGS])
    rows = torch.tensor([5, 1])
    assert torch.equal(q[rows].dequantize(), q.dequantize()[rows])
    assert q[rows].nbytes() * 4 == q.nbytes()


def test_zero_tokens_stay_zero_and_extremes_are_exact():
    x = torch.zeros(3, 4, dtype=torch.float16)
    x[1] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    x[2] = torch.tensor([-6e4, 6e4, 0.0, 1.0])
    q = quantize(x)
    y = q.dequantize()
    assert torch.equal(y[0], x[0])
    assert y[1, 1] == -2.0 and y[2, 0] == -6e4 and y[2, 1] == 6e4
    assert torch.isfinite(y).all()


def test_masks_are_not_quantized():
    with pytest.raises(TypeError, match="only float"):
        quantize(torch.ones(2, 3, dtype=torch.bool))
