"""The optimizer of a run and of stacked trials: AdamW over parameter groups, warmup then cosine.

- ``group_settings``: the one place that says, for a parameter, its group, lr and weight decay:
  a group the head declares (``RetrievalHead.parameter_groups``: AVIGATE's query tokens at
  100 x the lr with weight decay 0.2), else the learned logit scale at ``scale_lr`` (the
  releases train it among CLIP's parameters, at CLIP's lr), else the run's lr; weight decay
  where ``decays`` says;
- ``decays``: the no-decay rule (``no_decay``: nothing, names holding "bias", or biases, norms
  and the logit scale);
- ``lr_factor``: linear warmup, then cosine to 0 over the steps left (X-Pool, GAID) or BertAdam's
  cosine over the whole run (``warmup_cosine``: CLIP4Clip, AVIGATE);
- ``make_optimizer``: torch's AdamW over those groups, with the run's betas and eps;
- ``StackedAdamW``: the same update over stacked parameters [K, ...] of K trials (``avr sweep
  --parallel``), each trial with its own lr, schedule, weight decay and gradient clip, computed
  with the solo step's arithmetic operation for operation.

Departures from the releases' optimizers, all small: torch's AdamW corrects the moments' bias
(BertAdam, CLIP4Clip's and AVIGATE's, does not) and decays before its update (X-Pool's AdamW
after it); the gradient is clipped by the norm of all parameters together (BertAdam clips each
parameter alone); the warmup's first step takes lr / warmup_steps (the releases' take 0).
"""

from __future__ import annotations

import math

import torch

from avr.fuse.heads.base import (LOGIT_SCALE_MAX, LOGIT_SCALE_PARAMETER, GroupSpec,
                                 RetrievalHead)


def decays(name: str, ndim: int, no_decay: str = "bias_norm") -> bool:
    """Whether a parameter called ``name`` with ``ndim`` dimensions (of one trial's tensor) takes
    weight decay under the rule ``no_decay``: "none" (every parameter decays: X-Pool, GAID),
    "bias" (not those whose name holds "bias": CLIP4Clip, AVIGATE), "bias_norm" (not biases and
    norms, ndim < 2, nor the logit scale: open_clip's rule)."""
    if no_decay == "none":
        return True
    if no_decay == "bias":
        return "bias" not in name
    return ndim >= 2 and LOGIT_SCALE_PARAMETER not in name


def group_settings(name: str, ndim: int, config, declared: tuple[GroupSpec, ...] = ()
                   ) -> tuple[str, float, float]:
    """(group, lr, weight decay) of the parameter ``name`` under ``config`` (a TrainConfig):
    a group the head declares, else the logit scale's, else the run's decay or no-decay group."""
    group = next((spec for spec in declared if spec.holds(name)), None)
    if group is not None:
        return group.name, config.lr * group.lr_scale, group.weight_decay
    weight_decay = config.weight_decay if decays(name, ndim, config.no_decay) else 0.0
    if name == LOGIT_SCALE_PARAMETER:
        lr = config.lr if config.scale_lr is None else config.scale_lr
        return LOGIT_SCALE_PARAMETER, lr, weight_decay
    return ("decay" if weight_decay else "no_decay"), config.lr, weight_decay


def make_optimizer(head: RetrievalHead, config, total_steps: int):
    """torch's AdamW over the groups of ``group_settings``, with ``config``'s betas and eps, and
    ``lr_factor``'s schedule over ``total_steps``. ``config``: a resolved TrainConfig.

    The run's decay and no-decay groups come first (even empty), then the others; parameters of
    equal lr and weight decay share a group. A run written before parameter groups (its logit
    scale at its lr, without decay) so has the two groups it saved, and resumes."""
    groups = {(config.lr, config.weight_decay, True): ("decay", []),
              (config.lr, 0.0, False): ("no_decay", [])}
    declared = head.parameter_groups()
    for name, param in head.named_parameters():
        if param.requires_grad:
            group, lr, weight_decay = group_settings(name, param.ndim, config, declared)
            key = (lr, weight_decay, decays(name, param.ndim, config.no_decay))
            groups.setdefault(key, (group, []))[1].append(param)
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": group}
         for (lr, weight_decay, _), (group, params) in groups.items()],
        lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    warmup_steps = int(config.warmup * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, config.lr_schedule))


def lr_factor(step: int, warmup_steps: int, total_steps: int, shape: str = "cosine") -> float:
    """The learning rate's factor at ``step``: linear warmup, then ``shape``: "cosine" decays to
    0 over the steps after the warmup; "warmup_cosine" is BertAdam's 0.5 (1 + cos(pi t / T)),
    the cosine of the whole run (it starts just below 1 where the warmup ends)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "warmup_cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class StackedAdamW:
    """torch's AdamW (as ``make_optimizer`` sets it) over stacked parameters [K, ...]: trial k
    steps each parameter with ``configs[k]``'s lr for its group (times its warmup + cosine
    factor), weight decay and gradient clip. The trials of a stacked group share their betas,
    eps, schedule shape and head options (``avr.fuse.stacked.group_key``), so their declared
    groups too.

    Each trial's step is the solo step's arithmetic, operation for operation: ``clip_grad_norm_``'s
    norms and coefficient, single-tensor AdamW's decay, moments, denominator and ``addcdiv_``
    (value * exp_avg / denom), with its lr, decay factor and step size computed as the same Python
    floats. On the CPU a stacked trial's update is the solo update bit for bit."""

    def __init__(self, params: dict[str, torch.Tensor], configs: list, total_steps: int,
                 declared: tuple[GroupSpec, ...] = (), prefix: str = "head."):
        self.params = params
        self.configs = configs
        self.total_steps = total_steps
        self.warmup_steps = [int(config.warmup * total_steps) for config in configs]
        # per parameter: each trial's (lr before the schedule, weight decay), as in its solo run
        self.settings = {name: tuple(group_settings(name.removeprefix(prefix), p.ndim - 1, config,
                                                    declared)[1:] for config in configs)
                         for name, p in params.items()}
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}
        self.step_count = 0
        first = next(iter(params.values()))
        self.grad_clip = torch.tensor([config.grad_clip for config in configs],
                                      dtype=first.dtype, device=first.device)
        self.betas, self.eps = tuple(configs[0].betas), configs[0].eps

    def factors(self) -> list[float]:
        """Each trial's schedule factor at this step, as ``make_optimizer``'s LambdaLR sets it."""
        return [lr_factor(self.step_count, warmup, self.total_steps, config.lr_schedule)
                for config, warmup in zip(self.configs, self.warmup_steps)]

    def lrs(self) -> list[float]:
        """Each trial's lr (of its decay group) at this step."""
        return [config.lr * factor for config, factor in zip(self.configs, self.factors())]

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
        factors = [factor if on else 0.0 for factor, on in zip(self.factors(), active)]
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count
        coefficients: dict[tuple, torch.Tensor] = {}  # per distinct settings: decay, -step size
        for name, param in self.params.items():
            settings = self.settings[name]
            if settings not in coefficients:
                lrs = [lr * factor for (lr, _), factor in zip(settings, factors)]
                coefficients[settings] = torch.tensor(
                    [[1 - lr * weight_decay for lr, (_, weight_decay) in zip(lrs, settings)],
                     [-(lr / bias1) for lr in lrs]], dtype=first.dtype, device=first.device)
            decay, neg_step = coefficients[settings]
            shape = (-1,) + (1,) * (param.ndim - 1)
            grad = grads[name].mul_(clip.view(shape))
            if any(weight_decay for _, weight_decay in settings):
                param.mul_(decay.view(shape))
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias2 ** 0.5).add_(self.eps)
            param.add_(exp_avg * neg_step.view(shape) / denom)  # addcdiv_'s value * t1 / t2
            if name.endswith(LOGIT_SCALE_PARAMETER):
                param.clamp_(max=LOGIT_SCALE_MAX)  # CLIP's clamp, after the step
