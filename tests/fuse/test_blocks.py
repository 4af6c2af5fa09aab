"""The shared pieces of the heads: the InfoNCE loss, the attention softmax, the cosine scores.

Each is written for speed (ops vmap batches natively, a CPU softmax layout without torch's
short-axis slowdown, no normalised copy of the pooled vectors); here each equals the textbook
formula it replaces, forward and backward, and gives a stacked trial the bits it gives alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from avr.fuse import blocks
from avr.fuse.heads.base import symmetric_infonce


def reference_infonce(logits: torch.Tensor) -> torch.Tensor:
    target = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@pytest.mark.parametrize("size", [1, 2, 15, 16, 64])
def test_infonce_is_the_mean_of_both_cross_entropies(size):
    logits = (torch.randn(size, size, generator=torch.Generator().manual_seed(size)) * 8
              ).requires_grad_(True)
    ours, reference = symmetric_infonce(logits), reference_infonce(logits)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    grad, = torch.autograd.grad(ours, logits)
    reference_grad, = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-7)


def test_infonce_of_stacked_logits_is_each_slices_own_bit_for_bit():
    logits = torch.randn(16, 15, 15, generator=torch.Generator().manual_seed(0)) * 8
    assert torch.equal(vmap(symmetric_infonce)(logits),
                       torch.stack([symmetric_infonce(one) for one in logits]))


@pytest.mark.parametrize("keys", [1, 3, 12, 15, 16, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_last_is_softmax_over_the_last_axis(keys, dtype):
    logits = (torch.randn(5, 7, keys, generator=torch.Generator().manual_seed(keys)) * 4
              ).to(dtype).requires_grad_(True)
    upstream = torch.randn(5, 7, keys, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours, reference = blocks.softmax_last(logits), logits.softmax(-1)
    assert ours.shape == reference.shape and ours.dtype == dtype
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2,
                                                                                atol=1e-2)
    torch.testing.assert_close(ours, reference, **tolerance)
    grad, = torch.autograd.grad(ours, logits, upstream)
    reference_grad, = torch.autograd.grad(reference, logits, upstream)
    torch.testing.assert_close(grad, reference_grad, **tolerance)
    # stacked trials get each trial's own bits
    stacked = logits.detach().expand(4, -1, -1, -1) * torch.arange(1, 5).view(4, 1, 1, 1)
    assert torch.equal(vmap(blocks.softmax_last)(stacked),
                       torch.stack([blocks.softmax_last(one) for one in stacked]))


def test_masked_attention_zeroes_masked_keys_and_empty_rows():
    logits = torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False  # no valid key at all
    weights = blocks.masked_attention(logits, mask)
    assert torch.equal(weights[:, 1, 5:], torch.zeros(3, 7))
    assert torch.equal(weights[:, 2], torch.zeros(3, 12))
    torch.testing.assert_close(weights[:, [0, 1, 3]].sum(-1), torch.ones(3, 3))
    torch.testing.assert_close(weights[:, 1, :5], logits[:, 1, :5].softmax(-1))


def test_cosine_scores_are_the_cosines_and_zero_for_a_zero_vector():
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(4, 8, generator=generator, requires_grad=True)
    pooled = torch.randn(4, 5, 8, generator=generator)
    pooled[:, 2] = 0
    pooled.requires_grad_(True)
    ours = blocks.cosine_scores(text, pooled)
    reference = torch.einsum("qd,qvd->qv", F.normalize(text, dim=-1), F.normalize(pooled, dim=-1))
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[:, 2], torch.zeros(4))
    upstream = torch.randn(4, 5, generator=generator)
    grads = torch.autograd.grad(ours, (text, pooled), upstream)
    reference_grads = torch.autograd.grad(reference, (text, pooled), upstream)
    for grad, reference_grad in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)
