"""Head registry: ``@register_head`` names a head class; ``build_head`` builds one by name.

One file per head, each docstring naming the METHODS.md section it implements:
meanp, xpool, tefal, avigate, gais, htav.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from avr.errors import AvrError
from avr.fuse.heads.base import HeadConfig, RetrievalHead
from avr.schema import CacheSpec

HEADS: dict[str, type[RetrievalHead]] = {}


def register_head(name: str):
    def wrap(cls: type[RetrievalHead]) -> type[RetrievalHead]:
        cls.name = name
        HEADS[name] = cls
        return cls

    return wrap


def head_class(name: str) -> type[RetrievalHead]:
    _import_heads()
    try:
        return HEADS[name]
    except KeyError:
        raise AvrError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}") from None


def make_config(name: str, options: dict[str, Any] | None = None) -> HeadConfig:
    """The head's config dataclass with ``options`` applied; unknown keys are an error."""
    cls = head_class(name)
    known = {f.name: f for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise AvrError(f"head {name!r} has no option {', '.join(unknown)}; "
                       f"its options: {', '.join(sorted(known))}")
    return cls.Config(**(options or {}))


def video_inputs(name: str, *options: dict[str, Any] | None) -> tuple[str, ...]:
    """The video arrays head ``name`` reads when built with any of ``options`` (default: its
    default options): the union, in the head's order. What a loader shared by those runs loads."""
    cls = head_class(name)
    wanted = {array for opts in (options or ({},)) for array in
              cls.video_inputs_for(make_config(name, opts))}
    return tuple(array for array in cls.video_inputs if array in wanted)


def build_head(name: str, spec: CacheSpec, options: dict[str, Any] | None = None) -> RetrievalHead:
    return head_class(name)(spec, make_config(name, options))


def _import_heads() -> None:
    # Importing a head module runs its @register_head; every module here but base is a head.
    package = importlib.import_module(__name__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
