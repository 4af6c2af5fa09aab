"""The optimizer of a run and of stacked trials: AdamW, the no-decay rule, warmup then cosine.

- ``decays``: the one no-decay rule (biases, norms and the logit scale do not decay);
- ``make_optimizer``: torch's AdamW over the head's parameter groups with ``lr_factor``'s
  schedule (linear warmup, then cosine to 0), as a run trains alone;
- ``StackedAdamW``: the same update over stacked parameters [K, ...] of K trials (``avr sweep
  --parallel``), each trial with its own lr, schedule, weight decay and gradient clip, computed
  with the solo step's arithmetic operation for operation.
"""

from __future__ import annotations

import math

import torch

from avr.fuse.heads.base import LOGIT_SCALE_MAX, RetrievalHead

ADAMW_BETAS, ADAMW_EPS = (0.9, 0.98), 1e-6


def decays(name: str, ndim: int) -> bool:
    """Whether a parameter called ``name`` with ``ndim`` dimensions (of one trial's tensor)
    takes weight decay: not biases and norms (ndim < 2), not the logit scale."""
    return ndim >= 2 and "logit_scale" not in name


def make_optimizer(head: RetrievalHead, config, total_steps: int):
    """AdamW without decay where ``decays`` says so; warmup then cosine over ``total_steps``.
    ``config``: a TrainConfig (lr, weight_decay, warmup)."""
    decay, no_decay = [], []
    for name, param in head.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param.ndim) else no_decay).append(param)
    optimizer = torch.optim.AdamW([
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ], lr=config.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)
    warmup_steps = int(config.warmup * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's factor at ``step``: linear warmup, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class StackedAdamW:
    """torch's AdamW (as ``make_optimizer`` sets it) over stacked parameters [K, ...]: trial k
    steps with ``configs[k]``'s lr (times its warmup + cosine factor), weight decay and gradient
    clip.

    Each trial's step is the solo step's arithmetic, operation for operation: ``clip_grad_norm_``'s
    norms and coefficient, single-tensor AdamW's decay, moments, denominator and ``addcdiv_``
    (value * exp_avg / denom), with its lr, decay factor and step size computed as the same Python
    floats. On the CPU a stacked trial's update is the solo update bit for bit."""

    def __init__(self, params: dict[str, torch.Tensor], configs: list, total_steps: int):
        self.params = params
        self.configs = configs
        self.total_steps = total_steps
        self.warmup_steps = [int(config.warmup * total_steps) for config in configs]
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}
        self.step_count = 0
        first = next(iter(params.values()))
        self.grad_clip = torch.tensor([config.grad_clip for config in configs],
                                      dtype=first.dtype, device=first.device)

    def lrs(self) -> list[float]:
        """Each trial's lr at this step, as ``make_optimizer``'s LambdaLR sets it."""
        return [config.lr * lr_factor(self.step_count, warmup, self.total_steps)
                for config, warmup in zip(self.configs, self.warmup_steps)]

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], active: list[bool]) -> None:
        """One step, in place, with torch AdamW's operations; ``grads`` are scaled in place.
        Trials not ``active`` (pruned, stopped early) step with lr 0: their weights stay as they
        were (nothing reads their moments again)."""
        # clip_grad_norm_ per trial: the norm of its gradients' norms; max_norm / (norm + 1e-6),
        # which torch evaluates as (norm + 1e-6).reciprocal() * max_norm, at most 1
        first = next(iter(self.params.values()))
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1)
                             for g in grads.values()], 1)
        total = torch.linalg.vector_norm(norms, dim=1)
        clip = ((total + 1e-6).reciprocal() * self.grad_clip).clamp(max=1.0)
        lrs = [lr if on else 0.0 for lr, on in zip(self.lrs(), active)]
        self.step_count += 1
        beta1, beta2 = ADAMW_BETAS
        bias1, bias2 = 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count
        decay, neg_step = torch.tensor(
            [[1 - lr * config.weight_decay for lr, config in zip(lrs, self.configs)],
             [-(lr / bias1) for lr in lrs]], dtype=first.dtype, device=first.device)
        for name, param in self.params.items():
            shape = (-1,) + (1,) * (param.ndim - 1)
            grad = grads[name].mul_(clip.view(shape))
            if decays(name, param.ndim - 1):
                param.mul_(decay.view(shape))
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias2 ** 0.5).add_(ADAMW_EPS)
            param.add_(exp_avg * neg_step.view(shape) / denom)  # addcdiv_'s value * t1 / t2
            if name.endswith("logit_scale"):
                param.clamp_(max=LOGIT_SCALE_MAX)  # CLIP's clamp, after the step
