"""The schedule a run trains with when the user leaves it unset: the papers' 5 epochs of batch 128
at lr 1e-4 and CLIP's pretrained temperature, adapted to small train splits and to stores of
random backbones, with one line saying what departs from the papers and why.

- ``resolve_schedule``: the rules (below), applied to a TrainConfig for a split's size;
- ``schedule_for_store``: the same for the train split of a store.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from avr.fuse.config import (MIN_BATCHES_PER_EPOCH, MIN_STEPS, PAPER_SCHEDULE, SCRATCH_LR,
                             SCRATCH_TEMPERATURE, TrainConfig)
from avr.fuse.heads import head_class
from avr.fuse.heads.base import HeadConfig
from avr.store import schema
from avr.store.group import open_store
from avr.store.splits import split_size


def resolve_schedule(config: TrainConfig, spec: schema.CacheSpec, videos: int, captions: int
                     ) -> tuple[TrainConfig, str | None]:
    """``config`` with the epochs, batch size, learning rate and initial temperature the user
    left unset chosen for a train split of ``videos`` videos and ``captions`` captions, and one
    line saying how and why they depart from the papers' 5 epochs of batch 128 at lr 1e-4 and
    CLIP's pretrained temperature (None where they do not):

    - batch: the largest power of two up to 128 that gives an epoch at least
      ``MIN_BATCHES_PER_EPOCH`` batches (so 128 from 385 train videos on);
    - epochs: 5, or as many as give the optimizer ``MIN_STEPS`` steps at that batch;
    - lr: 1e-4 on CLIP's features, where a head fine-tunes an alignment CLIP already has;
      ``SCRATCH_LR`` on a store extracted with random backbones (``--backbones tiny``), whose
      features are aligned by nothing: there the head learns the alignment from scratch;
    - temperature: on such a store, a head whose learned logit scale starts at CLIP's
      pretrained 100 (``HeadConfig.temperature``) starts it where CLIP starts learning from
      scratch, ``SCRATCH_TEMPERATURE``; a fixed scale (GAIS) or one the head's own terms are
      tuned for (AVIGATE's margins) is part of its method and stays.
    """
    scratch = random_backbones(spec)
    unset = [name for name in PAPER_SCHEDULE if getattr(config, name) is None]
    if scratch and starts_at_pretrained_scale(config):
        config = dataclasses.replace(config, head_options={**config.head_options,
                                                           "temperature": SCRATCH_TEMPERATURE})
        unset.append("temperature")
    if not unset:
        return config, None
    batch = config.batch_size or schedule_batch_size(videos, config.shards)
    steps = math.ceil((videos if config.pairs == "one" else captions) / batch)
    epochs = config.epochs or max(PAPER_SCHEDULE["epochs"], math.ceil(MIN_STEPS / max(1, steps)))
    lr = config.lr or (SCRATCH_LR if scratch else PAPER_SCHEDULE["lr"])
    resolved = dataclasses.replace(config, epochs=epochs, batch_size=batch, lr=lr)
    return resolved, _schedule_note(resolved, unset, videos, scratch)


def starts_at_pretrained_scale(config: TrainConfig) -> bool:
    """Whether ``config``'s head, with the options the user gave, would learn a logit scale from
    CLIP's pretrained temperature because the user left its temperature unset."""
    options = config.head_options
    cls = head_class(config.head)
    default = cls.Config()
    learned = options.get("learn_temperature", default.learn_temperature)
    return ("temperature" not in options and learned and not cls.tuned_for_pretrained_scale
            and default.temperature == HeadConfig.temperature)


def schedule_for_store(cache_path: str | Path, config: TrainConfig
                       ) -> tuple[TrainConfig, str | None]:
    """``resolve_schedule`` for the train split of the store at ``cache_path``."""
    group, spec = open_store(cache_path)
    return resolve_schedule(config, spec, *split_size(group, "train"))


def schedule_batch_size(videos: int, shards: int = 1) -> int:
    """The largest power of two up to the papers' 128 that leaves an epoch of ``videos`` videos
    at least ``MIN_BATCHES_PER_EPOCH`` batches; at least 2 and a multiple of ``shards``."""
    batch = PAPER_SCHEDULE["batch_size"]
    while batch > 2 and math.ceil(videos / batch) < MIN_BATCHES_PER_EPOCH:
        batch //= 2
    return max(batch - batch % shards, shards, 2)


def random_backbones(spec: schema.CacheSpec) -> bool:
    """Whether the store's CLIP features come from a randomly initialised CLIP."""
    clip = spec.backbones.get("clip")
    return clip is not None and clip.weights.startswith("random:")


def _schedule_note(config: TrainConfig, unset: list[str], videos: int, scratch: bool
                   ) -> str | None:
    departs = [name for name in unset
               if name in PAPER_SCHEDULE and getattr(config, name) != PAPER_SCHEDULE[name]]
    sized = {"batch_size": (f"batch {config.batch_size}", str(PAPER_SCHEDULE["batch_size"]),
                            f"an epoch has at least {MIN_BATCHES_PER_EPOCH} batches"),
             "epochs": (f"{config.epochs} epochs", str(PAPER_SCHEDULE["epochs"]),
                        f"the run has at least {MIN_STEPS} optimizer steps")}
    changed = [sized[name] for name in sized if name in departs]
    reasons = []
    if changed:
        values, papers, goals = zip(*changed)
        reasons.append(f"small train split ({videos} videos): {', '.join(values)} instead of "
                       f"{' / '.join(papers)}, so that {' and '.join(goals)}")
    if "lr" in departs and scratch:
        reasons.append(f"lr {config.lr:g} instead of {PAPER_SCHEDULE['lr']:g}, because the "
                       f"store's CLIP is random: the head learns an alignment from scratch "
                       f"instead of fine-tuning CLIP's")
    if "temperature" in unset:
        reasons.append(f"temperature {SCRATCH_TEMPERATURE:g} instead of "
                       f"{HeadConfig.temperature:g}: a learned logit scale trained from scratch "
                       f"starts where CLIP's does")
    if not reasons:
        return None
    return "; ".join(reasons) + " (--epochs, --batch-size, --lr and --temperature set them)"
