"""Training options: ``TrainConfig``, and how users write it (a ``run.toml``, flags, ``--opt
key=value`` and sweep grids), merged here into one checked config.

Every value is converted to the type its field declares (:mod:`avr.fuse.fields`), a head's
options to the types of the head's ``Config`` fields, so ``epochs = "five"`` in a TOML file or
``--opt epochs=five`` fails at once, naming where it came from, instead of deep in training;
``--opt spans=1+2+4`` reaches HTAV as the tuple (1, 2, 4).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avr.device import resolve_device
from avr.errors import AvrError, InputFileError
from avr.files import read_text
from avr.fuse.fields import typed_fields
from avr.fuse.loggers import LOGGERS
from avr.fuse.heads import head_class, make_config
from avr.fuse.recipes import check_recipe_name
from avr.store.splits import RESIDENT


# The rules of ``avr.fuse.schedule`` on a train split too small for a recipe, or on features of
# random backbones (the recipes themselves: ``avr.fuse.recipes``).
MIN_BATCHES_PER_EPOCH = 4  # a batch is at most about a quarter of the split: epochs differ
MIN_STEPS = 250  # optimizer steps a default schedule gives at least (MSR-VTT 7k: 275 at 5 x 128)
SCRATCH_LR = 3e-3  # a head that learns an alignment from scratch (random backbones)
# The initial temperature of a learned logit scale trained from scratch: CLIP's own (Radford et
# al. 2021, Sec. 2.5; open_clip's init_logit_scale = ln(1 / 0.07)). The releases' 0.01 is the
# value CLIP reached in pretraining, which they fine-tune from.
SCRATCH_TEMPERATURE = 0.07
MAX_LR = 1.0  # past it AdamW's steps are larger than the weights: a run only diverges
MAX_WEIGHT_DECAY = 10.0
# What weight decay leaves out (``avr.fuse.optim.decays``): nothing (X-Pool, GAID), parameters
# named as biases (CLIP4Clip, AVIGATE), or biases, norms and the logit scale (open_clip's rule).
NO_DECAY = ("none", "bias", "bias_norm")
# The learning rate's shape after its linear warmup (``avr.fuse.optim.lr_factor``): cosine to 0
# over the steps left (X-Pool, GAID) or BertAdam's cosine over the whole run (CLIP4Clip, AVIGATE).
LR_SCHEDULES = ("cosine", "warmup_cosine")
# What runs written before recipes trained with, for the options they do not record.
BEFORE_RECIPES: dict[str, Any] = dict(betas=(0.9, 0.98), eps=1e-6, no_decay="bias_norm",
                                      lr_schedule="cosine")


@dataclass
class TrainConfig:
    """Training options; every field can come from flags, from ``--config run.toml`` or a sweep.
    Fields left None are chosen by ``avr.fuse.schedule.resolve_schedule`` from the head's recipe
    for the store; a value the user gives is never changed."""

    head: str = "tefal"
    head_options: dict[str, Any] = field(default_factory=dict)
    # None: the head's recipe for the store's dataset (avr.fuse.recipes), adapted by the rules
    # of avr.fuse.schedule to a small train split or to features of random backbones.
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None  # the head's new parameters
    scale_lr: float | None = None  # a learned logit scale (the releases' CLIP lr)
    weight_decay: float = 0.2  # every release's
    no_decay: str | None = None  # one of NO_DECAY
    betas: tuple[float, ...] | None = None  # AdamW's (beta1, beta2)
    eps: float | None = None  # AdamW's
    warmup: float = 0.1  # fraction of all steps spent in linear warmup, then lr_schedule
    lr_schedule: str | None = None  # one of LR_SCHEDULES
    grad_clip: float = 1.0
    recipe: str | None = None  # whose dataset's recipe (avr.fuse.recipes.DATASETS); None: the store's
    seed: int = 42
    pairs: str = "all"  # "all": every caption each epoch, as every release; "one": a random one
    early_stop: int = 0  # stop after this many epochs without a better val R@1 (0: never)
    shards: int = 1  # train video shards, each giving batch_size / shards pairs to every batch
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    score_chunk: int = 0  # videos per scoring block in validation; 0: chosen (avr.evaluate.score)
    # GB of cached arrays held on the host and on the device; None: what fits, with headroom.
    # Splits that do not fit are streamed from the store (avr.fuse.residency).
    memory_budget: float | None = None
    # Videos of a training batch encoded and scored at a time, their activations recomputed in
    # backward (RetrievalHead.loss_in_video_blocks); 0: the whole batch at once; None: the whole
    # batch, or blocks chosen from --memory-budget when one is given.
    video_block: int | None = None
    resident: str = "fp16"  # token arrays held as stored, or "int8" with a per-token fp16 scale
    shuffle_buffer: int = 0  # pairs in a streamed split's shuffle buffer; 0: chosen by the budget
    # Loggers beside log.csv and TensorBoard (avr.fuse.loggers): "wandb", "mlflow".
    loggers: tuple[str, ...] = ()

    def validate(self) -> None:
        """Every value finite and in range, the head's options its config's, the device known:
        checked before anything loads."""
        for name in ("lr", "weight_decay", "warmup", "grad_clip", "memory_budget"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise AvrError(f"{name} must be a finite number, not {value}")
        if self.pairs not in ("one", "all"):
            raise AvrError(f"pairs must be 'one' or 'all', not {self.pairs!r}")
        if (self.epochs or 1) < 1 or (self.batch_size or 2) < 2:
            raise AvrError("epochs must be >= 1 and batch size >= 2 (InfoNCE needs negatives)")
        if self.lr is not None and not 0 < self.lr <= MAX_LR:
            raise AvrError(f"lr must be in (0, {MAX_LR:g}], not {self.lr:g}: AdamW at a larger "
                           f"rate diverges")
        if not 0 <= self.weight_decay <= MAX_WEIGHT_DECAY or not self.grad_clip > 0:
            raise AvrError(f"weight_decay must be in [0, {MAX_WEIGHT_DECAY:g}] (not "
                           f"{self.weight_decay:g}) and grad_clip > 0 (not {self.grad_clip:g})")
        if self.scale_lr is not None and not self.scale_lr > 0:
            raise AvrError(f"scale_lr must be > 0, not {self.scale_lr}")
        if self.betas is not None and (len(self.betas) != 2
                                       or not all(0 <= beta < 1 for beta in self.betas)):
            raise AvrError(f"betas must be two numbers in [0, 1), not {self.betas}")
        if self.eps is not None and not self.eps > 0:
            raise AvrError(f"eps must be > 0, not {self.eps}")
        for name, value, choices in (("no_decay", self.no_decay, NO_DECAY),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES)):
            if value is not None and value not in choices:
                raise AvrError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        if self.recipe is not None:
            check_recipe_name(self.recipe)
        if not 0 <= self.warmup <= 1:
            raise AvrError(f"warmup is a fraction of all steps, in [0, 1], not {self.warmup}")
        if not 0 <= self.seed < 2 ** 32:
            raise AvrError(f"seed must be in [0, 2**32), not {self.seed}")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise AvrError(f"memory_budget is in GB and must be > 0, not {self.memory_budget}")
        if self.resident not in RESIDENT:
            raise AvrError(f"resident must be {' or '.join(RESIDENT)}, not {self.resident!r}")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise AvrError(f"logger {unknown[0]!r} is not one of {', '.join(LOGGERS)}")
        if self.shuffle_buffer < 0:
            raise AvrError(f"shuffle_buffer must be >= 0 pairs, not {self.shuffle_buffer}")
        if self.early_stop < 0 or self.score_chunk < 0 or (self.video_block or 0) < 0:
            raise AvrError(f"early_stop ({self.early_stop}), score_chunk ({self.score_chunk}) "
                           f"and video_block ({self.video_block}) must be >= 0")
        if self.shards < 1 or (self.batch_size or self.shards) % self.shards:
            raise AvrError(f"batch size {self.batch_size} must be a multiple of shards="
                           f"{self.shards} (>= 1): every shard gives each batch the same number "
                           f"of pairs")
        make_config(self.head, self.head_options)  # unknown head options fail now, not later
        if self.video_block and head_class(self.head).has_own_loss():
            raise AvrError(f"video_block: {self.head}'s loss has terms of its own beyond InfoNCE "
                           f"over the batch's scores, so it cannot take the batch's videos a "
                           f"block at a time")
        resolve_device(self.device)  # an unknown or absent device fails now, not later


TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Training options that runs written by an older avr name otherwise in config.json.
FORMER_NAMES = {"val_video_chunk": "score_chunk"}


def saved_train_config(saved: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a run's config.json records (its ``train`` table), former names read; a
    run written before recipes gets what it trained with (``BEFORE_RECIPES``; its logit scale
    at its lr)."""
    values = {FORMER_NAMES.get(k, k): v for k, v in saved.items()}
    if "lr_schedule" not in values:
        values = {**BEFORE_RECIPES, "scale_lr": values.get("lr"), **values}
    if values.get("betas") is not None:
        values["betas"] = tuple(values["betas"])
    return TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_FIELDS})


# Options a resumed run may change: they decide how long and where it trains, not what it
# learns at each step. Every other option is the run's own (``resume_changes`` refuses it).
RESUMABLE = ("epochs", "early_stop", "device", "amp", "score_chunk", "memory_budget", "loggers")


def split_options(options: dict[str, Any], head: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split flat ``key=value`` options into trainer fields and head options."""
    head_fields = {f.name for f in dataclasses.fields(head_class(head).Config)}
    train, head_opts = {}, {}
    for key, value in options.items():
        if key in head_fields:
            head_opts[key] = value
        elif key in TRAIN_FIELDS:
            train[key] = value
        else:
            raise AvrError(f"unknown option {key!r}: not a training option "
                           f"({', '.join(sorted(TRAIN_FIELDS - {'head', 'head_options'}))}) "
                           f"nor an option of head {head!r} ({', '.join(sorted(head_fields))})")
    return train, head_opts


def parse_value(text: str) -> Any:
    """``3e-4`` -> float, ``12`` -> int, ``true`` -> bool, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "fusion=concat"]`` -> ``{"lr": 1e-4, "fusion": "concat"}``."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AvrError(f"option {item!r} is not of the form key=value")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


@dataclass(frozen=True)
class Axis:
    """One searched option of a sweep: listed ``values``, or a numeric range [low, high], on a
    log scale or with a ``step``."""

    name: str
    values: tuple[Any, ...] = ()
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def text(self) -> str:
        if not self.is_range:
            return f"{self.name}={','.join(str(v) for v in self.values)}"
        tail = ":log" if self.log else f":{self.step}" if self.step is not None else ""
        return f"{self.name}={self.low}:{self.high}{tail}"


def parse_search_space(text: str) -> list[Axis]:
    """The axes of ``--grid``: space-separated terms, each ``key=v1,v2,...`` (a list) or
    ``key=low:high`` (a range; ``low:high:log`` on a log scale, ``low:high:STEP`` in steps),
    e.g. ``"lr=1e-5:1e-3:log temperature=0.02:0.1 fusion=add,concat"``. Keys are unchecked
    here (``avr.fuse.sweep`` checks them against the trainer and the head)."""
    axes = []
    for term in text.split():
        key, sep, values = term.partition("=")
        if not sep or not key or not values:
            raise AvrError(f"--grid: term {term!r} is not of the form key=v1,v2,... or "
                           f"key=low:high[:log]")
        name = key.strip().replace("-", "_")
        if name in (axis.name for axis in axes):
            raise AvrError(f"--grid: {name} is given twice")
        axes.append(_range_axis(name, values) or
                    Axis(name, tuple(parse_value(v) for v in values.split(",") if v)))
    if not axes:
        raise AvrError("--grid is empty: give terms like \"lr=1e-4,3e-4 temperature=0.02:0.1\"")
    return axes


def _range_axis(name: str, text: str) -> Axis | None:
    """``low:high[:log|:STEP]`` as an Axis, or None when ``text`` is not a numeric range."""
    parts = [parse_value(part) for part in text.split(":")]
    numeric = [isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts]
    if len(parts) < 2 or not all(numeric[:2]):
        return None
    low, high = parts[:2]
    if len(parts) > 3 or (len(parts) == 3 and parts[2] != "log" and not numeric[2]):
        raise AvrError(f"--grid: {name}={text} is not a range low:high, low:high:log or "
                       f"low:high:STEP")
    if not low < high:
        raise AvrError(f"--grid: {name}={text}: low must be below high")
    log = len(parts) == 3 and parts[2] == "log"
    if log and not low > 0:
        raise AvrError(f"--grid: {name}={text}: a log range needs low > 0")
    step = parts[2] if len(parts) == 3 and not log else None
    return Axis(name, low=low, high=high, log=log, step=step)


def grid_points(axes: list[Axis]) -> list[dict[str, Any]]:
    """Every combination of listed axes, in order (the first axis varies slowest)."""
    ranges = [axis.text() for axis in axes if axis.is_range]
    if ranges:
        raise AvrError(f"--search grid takes lists of values, not ranges ({' '.join(ranges)}): "
                       f"list the values, or use --search random or tpe")
    return [dict(zip((a.name for a in axes), combo))
            for combo in itertools.product(*(a.values for a in axes))]


def load_toml(path: Path) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """``run.toml`` as (training options, head options, cache location). Head options come
    from a ``[head_options]`` (or ``[head_opts]``) table, or from a ``[head]`` table that also
    holds the head's ``name``."""
    if not path.is_file():
        raise InputFileError(f"{path}: config file not found")
    try:
        data = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as error:
        raise InputFileError(f"{path}: not valid TOML: {error}") from None
    options = {**_table(data, "head_options", path), **_table(data, "head_opts", path)}
    if isinstance(data.get("head"), dict):
        table = data.pop("head")
        data["head"] = table.pop("name", TrainConfig.head)
        options.update(table)
    cache = data.pop("cache", None)
    if cache is not None and not isinstance(cache, str):
        raise InputFileError(f"{path}: cache = {cache!r} must be text (a path or a URL)")
    unknown = sorted(set(data) - TRAIN_FIELDS)
    if unknown:
        raise InputFileError(f"{path}: unknown training option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(TRAIN_FIELDS - {'head_options'}))}")
    return typed_fields(TrainConfig, data, str(path)), options, cache


def _table(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    table = data.pop(key, {})
    if not isinstance(table, dict):
        raise InputFileError(f"{path}: {key} must be a table ([{key}] with key = value lines)")
    return table


def train_config(config_file: Path | None, flags: dict[str, Any], opts: list[str], *,
                 start: TrainConfig | None = None, head_flags: dict[str, Any] | None = None
                 ) -> tuple[TrainConfig, str | None]:
    """The checked TrainConfig of ``run.toml`` (if any; else ``start``, else the defaults),
    overridden by ``flags`` (training options; None: not given) and ``head_flags`` (options of
    the head, typed and checked by its own config), overridden by ``--opt`` items; and the
    cache location the TOML file names."""
    values: dict[str, Any] = {}
    toml_head_options: dict[str, Any] = {}
    cache = None
    if start is not None:
        values = {k: v for k, v in dataclasses.asdict(start).items() if k != "head_options"}
        toml_head_options = dict(start.head_options)
    if config_file is not None:
        values, toml_head_options, cache = load_toml(config_file)
    values.update({k: v for k, v in flags.items() if v is not None})
    head = values.get("head", TrainConfig.head)
    merged_head_options = head_options(head, toml_head_options, f"{config_file} [head_options]")
    merged_head_options.update(head_options(head, {k: v for k, v in (head_flags or {}).items()
                                                   if v is not None}, "flag"))
    train_opts, head_opts = split_options(parse_options(opts), head)
    values.update(typed_fields(TrainConfig, train_opts, "--opt"))
    merged_head_options.update(head_options(head, head_opts, "--opt"))
    config = TrainConfig(**values, head_options=merged_head_options)
    config.validate()
    return config, cache


@dataclass
class TrainRequest:
    """What `avr train` was asked (``avr.fuse.trainer.train_from_options``): each flag None when
    not given."""

    cache: str | None = None
    config_file: Path | None = None
    train: dict[str, Any] = field(default_factory=dict)  # training options given as flags
    head: dict[str, Any] = field(default_factory=dict)  # head options given as flags
    opts: list[str] = field(default_factory=list)  # --opt key=value
    run_dir: Path | None = None
    resume: Path | None = None

    def given(self) -> dict[str, str]:
        """Each option the request gives, with where: its flag, ``--opt`` or the config file
        (the last of these that sets it wins, as ``train_config`` merges them)."""
        sources = {}
        if self.config_file is not None:
            train, head, _ = load_toml(self.config_file)
            sources.update(dict.fromkeys((*train, *head), str(self.config_file)))
        flags = {**self.train, **self.head}
        sources.update({key: f"--{key.replace('_', '-')}" for key, value in flags.items()
                        if value is not None})
        sources.update({key: f"--opt {key}" for key in parse_options(self.opts)})
        return sources

    def resume_flags(self) -> dict[str, Any]:
        """Every flag given with --resume, named as ``resume_changes`` reports them."""
        return {**self.train, **self.head, "config": self.config_file, "run_dir": self.run_dir}


def resume_changes(run_dir: Path, flags: dict[str, Any], opts: list[str]) -> dict[str, Any]:
    """The changes ``--resume RUN`` applies: the given ``flags`` (None: not given; keys are
    option names, shown as --flag-name) and ``--opt`` items, all of which must be options a run
    may change when it resumes (``RESUMABLE``). Any other is refused, named, with what
    to do instead: a resumed run keeps its own learning rate, batch, head options and seed."""
    given = {key: value for key, value in flags.items() if value is not None}
    options = parse_options(opts)
    refused = [f"--{key.replace('_', '-')}" for key in given if key not in RESUMABLE]
    refused += [f"--opt {key}" for key in options if key not in RESUMABLE]
    if refused:
        allowed = ", ".join(f"--{key.replace('_', '-')}" for key in RESUMABLE if key in flags)
        raise AvrError(f"--resume {run_dir} continues the run with its own settings; "
                       f"{', '.join(refused)} would change what it learns: start a new run "
                       f"instead (--run-dir). A resumed run takes {allowed}, --cache and "
                       f"--opt {'/'.join(RESUMABLE)}")
    return {**given, **typed_fields(TrainConfig, options, "--opt")}


def head_options(head: str, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` converted to the types of head ``head``'s option fields."""
    return typed_fields(head_class(head).Config, values, source)
