"""Compact residency of cached tokens: int8 per token with an fp16 absmax scale.

A token array ``x [..., D]`` (fp16 as the store holds it) is kept as ``q = round(x / s)`` in
int8 with ``s = max|x| / 127`` per token (the last axis), one fp16 scale per token: D + 2 bytes
a token instead of 2 D, 50.1% of fp16 at D = 768 (AST) and 50.2% at D = 512 (CLIP). Dequantizing
is ``q * s`` in the caller's dtype, per batch, on the device that computes with it, so memory and
host-to-device transfers hold half the bytes. Per-token absmax keeps every token's direction to
within the rounding of its largest component: the error of each component is at most s / 2, so
the cosine of a token with its dequantized copy is at least about 1 - D (s/2)^2 / (2 |x|^2);
``cosine_fidelity`` measures it (benchmarks/quantize_tokens.py, BENCHMARKS.md).

Only token arrays are quantized (``is_token_array``: float arrays of rows of tokens, at least
[rows, tokens, D]); masks, flags and one-vector-per-row embeddings stay as they are. A token of
zeros keeps scale 0 and dequantizes to zeros. The trainer's ``--resident int8`` keeps the cached
token arrays this way (:mod:`avr.fuse.residency`); ``on_device`` is where a batch of rows,
quantized or not, meets the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INT8_MAX = 127


@dataclass
class QuantizedTokens:
    """int8 tokens ``values [..., D]`` and their fp16 ``scales [..., 1]``, rows first."""

    values: torch.Tensor  # int8
    scales: torch.Tensor  # float16

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def nbytes(self) -> int:
        return (self.values.numel() * self.values.element_size()
                + self.scales.numel() * self.scales.element_size())

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, index: torch.Tensor | slice | int) -> QuantizedTokens:
        """These rows, still quantized (what a batch moves to the device)."""
        return QuantizedTokens(self.values[index], self.scales[index])

    def pin_memory(self) -> QuantizedTokens:
        return QuantizedTokens(self.values.pin_memory(), self.scales.pin_memory())

    def to(self, device: str | torch.device, non_blocking: bool = False) -> QuantizedTokens:
        return QuantizedTokens(self.values.to(device, non_blocking=non_blocking),
                               self.scales.to(device, non_blocking=non_blocking))

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return self.values.to(dtype) * self.scales.to(dtype)


Held = "torch.Tensor | QuantizedTokens"  # an array's rows as memory holds them


def is_token_array(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether an array of this shape (rows first) and numpy dtype holds tokens that
    ``--resident int8`` quantizes: float rows of several D-vectors (frames, patches, text
    tokens, Swin stages), not one vector per row."""
    return len(shape) >= 3 and np.issubdtype(np.dtype(dtype), np.floating)


def held_bytes(value: Held) -> int:
    """Bytes of an array's rows as held in memory."""
    if isinstance(value, QuantizedTokens):
        return value.nbytes()
    return value.numel() * value.element_size()


def on_device(rows: dict[str, Held], device: torch.device,
              dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A batch of rows moved to ``device``; quantized tokens move as int8 and are dequantized
    there to ``dtype`` (the store's 16-bit floats)."""
    return {name: value.to(device, non_blocking=True).dequantize(dtype)
            if isinstance(value, QuantizedTokens) else value.to(device, non_blocking=True)
            for name, value in rows.items()}


def quantize(tokens: torch.Tensor) -> QuantizedTokens:
    """int8 per-token absmax quantization of float ``tokens [..., D]`` (module docstring)."""
    if not tokens.is_floating_point():
        raise TypeError(f"only float token arrays are quantized, got {tokens.dtype}")
    x = tokens.float()
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scales = (absmax / INT8_MAX).to(torch.float16)
    # Divide by the fp16 scale that is stored, so that q * s reproduces x as closely as it can.
    stored = scales.float()
    values = torch.where(stored > 0, x / stored.clamp_min(torch.finfo(torch.float32).tiny),
                         torch.zeros_like(x))
    return QuantizedTokens(values.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scales)


def cosine_fidelity(tokens: torch.Tensor, quantized: QuantizedTokens) -> dict[str, float]:
    """Cosine of each non-zero token with its dequantized copy: mean, minimum and 0.1%
    quantile, and the bytes of the quantized tokens as a fraction of fp16."""
    x = tokens.float().reshape(-1, tokens.shape[-1])
    y = quantized.dequantize(torch.float32).reshape(-1, tokens.shape[-1])
    keep = x.norm(dim=-1) > 0
    cos = torch.nn.functional.cosine_similarity(x[keep], y[keep], dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "cosine_p001": float(torch.quantile(cos[:1_000_000], 0.001)),
            "bytes_vs_fp16": quantized.nbytes() / (tokens.numel() * 2)}
