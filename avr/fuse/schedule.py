"""What a run trains with where the user leaves an option unset: the head's recipe for the
store's dataset (``avr.fuse.recipes``, every value the paper's or its release's), adapted to a
train split too small for it and to stores of random backbones, with one line saying what
departs from the recipe and why, and the source of every value (``avr train --dry-run``).

- ``resolve``: the recipe, then the rules (``resolve``'s docstring), for a TrainConfig and a
  train split's size: a ``Resolution`` (the config, its note, each value's source, which values
  the recipe and rules chose). ``fixed`` names options set elsewhere (a sweep's grid): they are
  neither chosen nor said to change;
- ``resolve_schedule``: (config, note) of ``resolve``, what a run and a sweep's trial use;
- ``schedule_for_store``: the same for the train split of a store;
- ``plan_run``: everything a run of a config on a store would use, with the source of each value,
  training nothing and writing nothing (``avr train --dry-run``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avr.fuse import ddp
from avr.fuse.config import (MIN_BATCHES_PER_EPOCH, MIN_STEPS, SCRATCH_LR, SCRATCH_TEMPERATURE,
                             TrainConfig)
from avr.fuse.heads import head_class, make_config
from avr.fuse.heads.base import HeadConfig
from avr.fuse.recipes import TRAIN_SETTINGS, Recipe, recipe_for
from avr.store import schema
from avr.store.group import open_store
from avr.store.location import location_text
from avr.store.splits import split_size

SMALL_SPLIT = "small-split rule"
RANDOM_BACKBONES = "random-backbone rule"


@dataclass
class Resolution:
    """A config with its unset options chosen, the line saying what departs from the recipe
    (None where nothing does), the source of each chosen value and the recipe taken."""

    config: TrainConfig
    note: str | None
    sources: dict[str, str] = field(default_factory=dict)  # option -> where its value comes from
    recipe: Recipe | None = None

    @property
    def chosen(self) -> set[str]:
        """The options the recipe and the rules chose (the rest were given)."""
        return set(self.sources)


def resolve(config: TrainConfig, spec: schema.CacheSpec, videos: int, captions: int, *,
            fixed: frozenset[str] | set[str] = frozenset()) -> Resolution:
    """``config`` with every option the user left unset (a None training option, a head option
    absent from ``head_options``) taken from the head's recipe for the store's dataset (or
    ``config.recipe``'s), then adapted to a train split of ``videos`` videos and ``captions``
    captions and to the store's backbones:

    - frames: at most the store's cached frames (a recipe asking for more reads every one);
    - batch: the recipe's, halved until an epoch has at least ``MIN_BATCHES_PER_EPOCH`` batches
      (so 128 from 385 train videos on);
    - epochs: the recipe's, or as many as give the optimizer ``MIN_STEPS`` steps at that batch;
    - on a store extracted with random backbones (``--backbones tiny``), whose features no
      pretraining aligned: lr ``SCRATCH_LR`` (the head learns an alignment from scratch rather
      than fine-tuning CLIP's); a head whose learned logit scale starts at CLIP's pretrained 100
      (``HeadConfig.temperature``) starts it at ``SCRATCH_TEMPERATURE``, where CLIP starts
      learning from scratch, and trains it at the head's lr rather than the releases' CLIP lr,
      at which it would not move; a fixed scale (GAIS) or one the head's own terms are tuned for
      (AVIGATE's margins) is part of its method and stays.

    Options in ``fixed`` (set elsewhere: a sweep's grid) are left as they are and never named
    in the note. A value the user gives is never changed."""
    recipe = recipe_for(config.head, config.recipe or spec.dataset)
    clip = spec.backbones["clip"].name if "clip" in spec.backbones else None
    head_fields = {f.name for f in dataclasses.fields(head_class(config.head).Config)}
    train, options, sources = {}, dict(config.head_options), {}
    for name, setting in recipe.settings.items():
        value = setting.value_for(clip)
        if name in fixed:
            continue
        if name in TRAIN_SETTINGS and getattr(config, name) is None:
            train[name] = tuple(value) if isinstance(value, list) else value
        elif name in head_fields and name not in config.head_options:
            options[name] = value
        else:
            continue
        sources[name] = f"recipe {recipe.head}/{recipe.dataset}: {setting.source}"
    notes = [note for note in (recipe.note, head_class(config.head).store_note(spec)) if note]
    resolved = dataclasses.replace(config, **train, head_options=options)
    resolved = _fit_frames(resolved, spec, sources, notes)
    resolved = _fit_split(resolved, recipe.settings["batch_size"].value_for(clip), videos,
                          captions, sources, notes, fixed)
    resolved = _from_scratch(resolved, config, spec, sources, notes, fixed)
    note = "; ".join(notes) + " (flags and --opt set them)" if notes else None
    return Resolution(resolved, note, sources, recipe)


def _fit_frames(config: TrainConfig, spec: schema.CacheSpec, sources: dict[str, str],
                notes: list[str]) -> TrainConfig:
    """A recipe's frame count above the store's: every cached frame, said in the note."""
    frames = config.head_options.get("frames")
    if "frames" not in sources or not frames or frames <= spec.num_frames:
        return config
    notes.append(f"frames {spec.num_frames} instead of {frames}: the store holds "
                 f"{spec.num_frames} frames per video")
    sources["frames"] += f"; at most the store's {spec.num_frames}"
    return dataclasses.replace(config, head_options={**config.head_options,
                                                     "frames": spec.num_frames})


def _fit_split(config: TrainConfig, recipe_batch: int, videos: int, captions: int,
               sources: dict[str, str], notes: list[str], fixed) -> TrainConfig:
    """The small-split rule on the batch and the epochs the recipe chose (``recipe_batch``: the
    batch to count steps with when a sweep's grid sets it)."""
    batch = config.batch_size or recipe_batch
    if "batch_size" in sources:
        batch = schedule_batch_size(videos, config.shards, config.batch_size)
    steps = math.ceil((videos if config.pairs == "one" else captions) / batch)
    epochs = config.epochs
    if "epochs" in sources:
        epochs = max(config.epochs, math.ceil(MIN_STEPS / max(1, steps)))
    changed = []
    for name, value, goal in (
            ("batch_size", batch, f"an epoch has at least {MIN_BATCHES_PER_EPOCH} batches"),
            ("epochs", epochs, f"the run has at least {MIN_STEPS} optimizer steps")):
        if name in sources and name not in fixed and value != getattr(config, name):
            changed.append((name, value, getattr(config, name), goal))
            sources[name] = f"{SMALL_SPLIT}: {goal} ({sources[name]})"
    if changed:
        shown = {"batch_size": "batch {}", "epochs": "{} epochs"}
        notes.append(f"small train split ({videos} videos): "
                     f"{', '.join(shown[n].format(v) for n, v, _, _ in changed)} instead of "
                     f"{' / '.join(str(old) for _, _, old, _ in changed)}, so that "
                     f"{' and '.join(goal for _, _, _, goal in changed)}")
    return dataclasses.replace(config, **{name: value for name, value in
                                          (("batch_size", batch), ("epochs", epochs))
                                          if name in sources})


def _from_scratch(config: TrainConfig, given: TrainConfig, spec: schema.CacheSpec,
                  sources: dict[str, str], notes: list[str], fixed) -> TrainConfig:
    """The random-backbone rule on the lr, the initial temperature and the logit scale's lr."""
    if not random_backbones(spec):
        return config
    changes: dict[str, Any] = {}
    if "lr" in sources and "lr" not in fixed:
        notes.append(f"lr {SCRATCH_LR:g} instead of {config.lr:g}, because the store's CLIP is "
                     f"random: the head learns an alignment from scratch instead of fine-tuning "
                     f"CLIP's")
        changes["lr"] = SCRATCH_LR
        sources["lr"] = f"{RANDOM_BACKBONES}: the store's CLIP is random"
    if starts_at_pretrained_scale(given) and "temperature" not in fixed:
        notes.append(f"temperature {SCRATCH_TEMPERATURE:g} instead of "
                     f"{HeadConfig.temperature:g}: a learned logit scale trained from scratch "
                     f"starts where CLIP's does")
        changes["head_options"] = {**config.head_options, "temperature": SCRATCH_TEMPERATURE}
        sources["temperature"] = f"{RANDOM_BACKBONES}: CLIP's from-scratch logit scale"
        if "scale_lr" in sources and "scale_lr" not in fixed:
            lr = changes.get("lr", config.lr)  # None: a lr set elsewhere (a sweep's grid)
            notes.append(f"the logit scale at {'the head' if lr is None else 'lr'}"
                         f"{'' if lr is None else f' {lr:g}'} instead of {config.scale_lr:g}: "
                         f"from scratch it must learn")
            changes["scale_lr"] = lr
            sources["scale_lr"] = f"{RANDOM_BACKBONES}: the logit scale learns with the head"
    return dataclasses.replace(config, **changes)


def resolve_schedule(config: TrainConfig, spec: schema.CacheSpec, videos: int, captions: int,
                     *, fixed: frozenset[str] | set[str] = frozenset()
                     ) -> tuple[TrainConfig, str | None]:
    """``resolve``'s config and note."""
    resolution = resolve(config, spec, videos, captions, fixed=fixed)
    return resolution.config, resolution.note


def starts_at_pretrained_scale(config: TrainConfig) -> bool:
    """Whether ``config``'s head, with the options the user gave, would learn a logit scale from
    CLIP's pretrained temperature because the user left its temperature unset."""
    options = config.head_options
    cls = head_class(config.head)
    default = cls.Config()
    learned = options.get("learn_temperature", default.learn_temperature)
    return ("temperature" not in options and learned and not cls.tuned_for_pretrained_scale
            and default.temperature == HeadConfig.temperature)


def schedule_for_store(cache_path: str | Path, config: TrainConfig, *,
                       fixed: frozenset[str] | set[str] = frozenset()
                       ) -> tuple[TrainConfig, str | None]:
    """``resolve_schedule`` for the train split of the store at ``cache_path``."""
    group, spec = open_store(cache_path)
    return resolve_schedule(config, spec, *split_size(group, "train"), fixed=fixed)


def schedule_batch_size(videos: int, shards: int = 1, batch: int = 128) -> int:
    """``batch``, halved until an epoch of ``videos`` videos has at least
    ``MIN_BATCHES_PER_EPOCH`` batches; at least 2 and a multiple of ``shards``."""
    while batch > 2 and math.ceil(videos / batch) < MIN_BATCHES_PER_EPOCH:
        batch //= 2
    return max(batch - batch % shards, shards, 2)


def random_backbones(spec: schema.CacheSpec) -> bool:
    """Whether the store's CLIP features come from a randomly initialised CLIP."""
    clip = spec.backbones.get("clip")
    return clip is not None and clip.weights.startswith("random:")


# ---- avr train --dry-run ------------------------------------------------------------------------

def plan_run(config: TrainConfig, cache_path: str | Path,
             given: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything a new run of ``config`` on the store at ``cache_path`` would use, trained on
    nothing and written nowhere: its ``train`` and ``head_options`` as config.json would record
    them, the line its run prints first (``schedule``), its residency plan, and ``sources``: for
    every option, where its value comes from (``given``: the options the user gave, each with
    where: a flag, --opt, run.toml; the recipe and the rules; else the defaults)."""
    from avr.device import resolve_device
    from avr.fuse.heads import video_inputs
    from avr.fuse.residency import plan_residency

    group, spec = open_store(cache_path)
    videos, captions = split_size(group, "train")
    resolution = resolve(config, spec, videos, captions)
    config = resolution.config
    head_config = make_config(config.head, config.head_options)
    cls = head_class(config.head)
    plan = plan_residency(cache_path, config, resolve_device(config.device),
                          video_inputs(config.head, config.head_options, spec=spec),
                          cls.caption_inputs,
                          ddp.SINGLE, blockwise=not cls.has_own_loss())
    recipe_sources = {name: f"recipe {resolution.recipe.head}/{resolution.recipe.dataset}: "
                            f"{setting.source}"
                      for name, setting in resolution.recipe.settings.items()}
    train = dataclasses.asdict(config)
    head_options = dataclasses.asdict(head_config)
    given = given or {}
    sources = {}
    for name in (*(name for name in train if name != "head_options"), *head_options):
        value = train.get(name, head_options.get(name))
        recipe = resolution.recipe.settings.get(name)
        sources[name] = (resolution.sources.get(name) or given.get(name)
                         or (recipe_sources[name] if recipe is not None
                             and _same(recipe.value, value) else None)
                         or ("avr default" if name in train else f"{config.head}'s default"))
    return {"head": config.head, "cache": location_text(cache_path), "dataset": spec.dataset,
            "train_videos": videos, "train_captions": captions, "train": train,
            "head_options": head_options, "schedule": resolution.note,
            "residency": plan.to_json(), "residency_line": plan.describe(), "sources": sources}


def _same(recipe_value: Any, value: Any) -> bool:
    return (list(value) if isinstance(value, tuple) else value) == recipe_value
