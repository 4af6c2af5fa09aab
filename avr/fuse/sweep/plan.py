"""What a sweep is: its plan (the store, the searched axes, the search, the fixed options), the
checks that refuse a plan before anything trains, and each trial's options and config.

- A plan is stored in its study (``to_json``), so every worker of a sweep trains the same one.
- ``check_plan`` builds the config of every grid point (random, tpe: every listed value and
  both ends of every range): a configuration that cannot train is refused before any does.
- ``suggest`` asks a trial for its options; random and tpe draw only the options of the
  trial's head (a conditional space), a grid point sets every axis.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from avr.errors import AvrError
from avr.fuse.config import (TRAIN_FIELDS, Axis, TrainConfig, grid_points, head_options,
                             parse_search_space, split_options)
from avr.fuse.fields import typed_fields
from avr.fuse.heads import head_class

SEARCHES = ("grid", "random", "tpe")
HEARTBEAT_S = 20  # default seconds between a running trial's heartbeats in the study
GRACE_HEARTBEATS = 6  # heartbeats a lost trial misses before another worker takes it
METRIC = "val R@1"  # what every trial reports after each epoch, as the study names it
LOG_RATIO = 3  # listed positive values spanning this ratio or more are drawn on a log axis


@dataclass
class SweepPlan:
    """A sweep's definition; stored in its study so that every worker trains the same sweep."""

    cache: str
    grid: str
    search: str
    trials: int | None  # configurations to draw (random, tpe); a grid trains all of its points
    prune: bool
    base: TrainConfig  # the fixed options every trial starts from
    heartbeat: int = HEARTBEAT_S  # seconds between a running trial's heartbeats

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "base": dataclasses.asdict(self.base)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepPlan:
        return cls(**{**data, "base": TrainConfig(**data["base"])})

    @property
    def axes(self) -> list[Axis]:
        return checked_axes(self.base, parse_search_space(self.grid))

    @property
    def searches_head(self) -> bool:
        return any(axis.name == "head" for axis in self.axes)

    def size(self) -> int:
        """Trials the sweep trains: every grid point, or ``trials``."""
        return len(grid_points(self.axes)) if self.search == "grid" else int(self.trials)


def checked_axes(base: TrainConfig, axes: list[Axis]) -> list[Axis]:
    """``axes`` with the head axis first and every value typed as the option it sets (a
    training option, or an option of at least one of the searched heads)."""
    head_axis = [axis for axis in axes if axis.name == "head"]
    heads = list(head_axis[0].values) if head_axis else [base.head]
    if head_axis and head_axis[0].is_range:
        raise AvrError("--grid: head takes a list of heads (head=xpool,tefal), not a range")
    for head in heads:
        head_class(head)
    checked = head_axis[:]
    for axis in axes:
        if axis.name == "head":
            continue
        config_class = _option_class(axis.name, heads)
        bounds = (axis.low, axis.high) if axis.is_range else axis.values
        typed = [typed_fields(config_class, {axis.name: v}, "--grid")[axis.name] for v in bounds]
        if axis.is_range:
            if any(isinstance(v, (bool, str)) for v in typed):
                raise AvrError(f"--grid: {axis.text()}: a range needs a numeric option")
            checked.append(dataclasses.replace(axis, low=typed[0], high=typed[1]))
        else:
            checked.append(dataclasses.replace(axis, values=tuple(typed)))
    return checked


def _option_class(name: str, heads: list[str]) -> type:
    if name in TRAIN_FIELDS - {"head", "head_options"}:
        return TrainConfig
    for head in heads:
        if name in head_fields(head):
            return head_class(head).Config
    split_options({name: None}, heads[0])  # raises, naming the options there are
    raise AssertionError(name)


def head_fields(head: str) -> set[str]:
    return {f.name for f in dataclasses.fields(head_class(head).Config)}


def trial_config(base: TrainConfig, options: dict[str, Any]) -> TrainConfig:
    """The checked TrainConfig of one trial: ``base`` with the trial's options. When the head is
    searched, options of other heads (fixed or searched) are left out of this head's config."""
    head = options.get("head", base.head)
    fields = head_fields(head)
    fixed = {k: v for k, v in base.head_options.items() if head == base.head or k in fields}
    searched = {k: v for k, v in options.items()
                if k != "head" and (k in fields or k in TRAIN_FIELDS)}
    train_opts, head_opts = split_options(searched, head)
    config = dataclasses.replace(
        base, head=head, head_options={**fixed, **head_options(head, head_opts, "--grid")},
        **typed_fields(TrainConfig, train_opts, "--grid"))
    config.validate()
    return config


def check_plan(plan: SweepPlan) -> None:
    """Refuse, before any training, a sweep with a configuration that cannot train: every grid
    point, or for random and tpe every listed value and both ends of every range."""
    if plan.search not in SEARCHES:
        raise AvrError(f"--search {plan.search!r} is not one of {', '.join(SEARCHES)}")
    if plan.search != "grid" and not (plan.trials or 0) >= 1:
        raise AvrError(f"--search {plan.search} needs --trials N (N >= 1)")
    if not plan.heartbeat >= 1:
        raise AvrError(f"--heartbeat {plan.heartbeat}: must be at least 1 second")
    axes = plan.axes
    for options in grid_points(axes) if plan.search == "grid" else _probe_points(axes):
        trial_config(plan.base, options)


def _probe_points(axes: list[Axis]) -> list[dict[str, Any]]:
    """Configurations that together take every listed value and both ends of every range."""
    first = {a.name: a.low if a.is_range else a.values[0] for a in axes}
    points = [first]
    for axis in axes:
        for value in (axis.low, axis.high) if axis.is_range else axis.values:
            points.append({**first, axis.name: value})
    return points


def resolve_plan(name: str, stored: SweepPlan | None, *, grid: str | None, search: str | None,
                 trials: int | None, prune: bool, cache: str | None, flags: dict[str, Any],
                 opts: list[str], heartbeat: int | None = None) -> SweepPlan:
    """The plan this worker trains: a new one from the options given (``flags`` None where not
    given), or the stored one with the options given laid over it (``open_study`` refuses a
    plan that differs from the stored one)."""
    from avr.fuse.config import train_config

    if stored is None:
        if grid is None:
            raise AvrError(f"there is no sweep named {name!r} yet: start it with --grid "
                           f"\"lr=1e-5:1e-3:log temperature=0.02:0.1\" (and --search, --trials)")
        base, _ = train_config(None, flags, opts)
        plan = SweepPlan(cache or "cache", grid, search or "grid", trials, prune, base,
                         heartbeat or HEARTBEAT_S)
    else:
        base, _ = train_config(None, flags, opts, start=stored.base)
        plan = SweepPlan(cache or stored.cache, grid or stored.grid, search or stored.search,
                         trials if trials is not None else stored.trials, prune or stored.prune,
                         base, heartbeat or stored.heartbeat)
    check_plan(plan)
    return plan


def check_store(plan: SweepPlan) -> None:
    """Refuse, before anything is drawn, a missing store, or one that leaves an array the swept
    head reads unwritten on purpose (a searched head's arrays are checked as it loads)."""
    from avr.fuse.heads import video_inputs
    from avr.store.group import open_store
    from avr.store.read import require_arrays_written

    open_store(plan.cache)
    if not plan.searches_head:
        head = plan.base.head
        require_arrays_written(plan.cache, (*video_inputs(head, plan.base.head_options),
                                            *head_class(head).caption_inputs))


def plan_differences(stored: SweepPlan, given: SweepPlan) -> str:
    """What ``given`` changes in ``stored``, or "". The device is each worker's own."""
    old, new = stored.to_json(), given.to_json()
    old.update(old.pop("base")), new.update(new.pop("base"))
    return "; ".join(f"{key}: {old.get(key)!r} there, {new.get(key)!r} here"
                     for key in sorted(set(old) | set(new))
                     if key != "device" and old.get(key) != new.get(key))


def suggest(trial, plan: SweepPlan, numeric_grid: bool = False) -> dict[str, Any]:
    """The trial's options. random and tpe draw only the options of the trial's head (a
    conditional space); a grid point sets every axis, and the trial ignores other heads'.
    With ``numeric_grid`` a grid's list of numbers is recorded as a numeric distribution (log
    when its positive values span ``LOG_RATIO`` or more), so that Optuna's plots and dashboard
    draw it on a numeric axis; random and tpe draw a list's values only, as categories."""
    options: dict[str, Any] = {}
    head = plan.base.head
    for axis in plan.axes:
        if plan.search != "grid" and axis.name not in TRAIN_FIELDS and axis.name != "head" \
                and axis.name not in head_fields(head):
            continue
        options[axis.name] = _suggest_axis(trial, axis, numeric_grid and plan.search == "grid")
        if axis.name == "head":
            head = options["head"]
    return options


def _suggest_axis(trial, axis: Axis, numeric_list: bool) -> Any:
    if not axis.is_range:
        values = axis.values
        if not (numeric_list and len(values) > 1 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            return trial.suggest_categorical(axis.name, list(values))
        low, high = min(values), max(values)
        log = low > 0 and high >= LOG_RATIO * low
        if all(isinstance(v, int) for v in values):
            return trial.suggest_int(axis.name, low, high, log=log)
        return trial.suggest_float(axis.name, low, high, log=log)
    if all(isinstance(v, int) for v in (axis.low, axis.high, axis.step or 1)):
        return trial.suggest_int(axis.name, axis.low, axis.high, step=axis.step or 1, log=axis.log)
    return trial.suggest_float(axis.name, axis.low, axis.high, step=axis.step, log=axis.log)
