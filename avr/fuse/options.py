"""Training options as users write them: a ``run.toml``, flags, ``--opt key=value`` and sweep
grids, merged into one checked ``TrainConfig``.

Every value is checked against the type of the default it replaces (nanoGPT's configurator
rule; an int is taken where a float is expected), so ``epochs = "five"`` in a TOML file or
``--opt epochs=five`` fails at once, naming where it came from, instead of deep in training.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avr.errors import AvrError
from avr.files import InputFileError, read_text
from avr.fuse.heads import head_class
from avr.fuse.trainer import TRAIN_FIELDS, TrainConfig, split_options

TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


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


def typed_options(config_class: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` with each one checked against the type of the same field's default in the
    dataclass ``config_class``; ints become floats where the default is a float. Fields whose
    default is not a bool, int, float or str, and keys that are not fields, are left to the
    config's own checks. Raises AvrError naming ``source``, the key and the type expected."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    checked = {}
    for key, value in values.items():
        default = defaults.get(key)
        expected = type(default)
        if expected in TYPE_NAMES:
            if expected is float and type(value) is int:
                value = float(value)
            if type(value) is not expected:
                raise AvrError(f"{source}: {key} = {value!r} must be {TYPE_NAMES[expected]} "
                               f"(its default is {default!r})")
        checked[key] = value
    return checked


def head_options(head: str, values: dict[str, Any], source: str) -> dict[str, Any]:
    return typed_options(head_class(head).Config, values, source)


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
    return typed_options(TrainConfig, data, str(path)), options, cache


def _table(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    table = data.pop(key, {})
    if not isinstance(table, dict):
        raise InputFileError(f"{path}: {key} must be a table ([{key}] with key = value lines)")
    return table


def train_config(config_file: Path | None, flags: dict[str, Any], opts: list[str], *,
                 start: TrainConfig | None = None) -> tuple[TrainConfig, str | None]:
    """The checked TrainConfig of ``run.toml`` (if any; else ``start``, else the defaults),
    overridden by ``flags`` (None: not given), overridden by ``--opt`` items; and the cache
    location the TOML file names."""
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
    train_opts, head_opts = split_options(parse_options(opts), head)
    values.update(typed_options(TrainConfig, train_opts, "--opt"))
    merged_head_options.update(head_options(head, head_opts, "--opt"))
    config = TrainConfig(**values, head_options=merged_head_options)
    config.validate()
    return config, cache
