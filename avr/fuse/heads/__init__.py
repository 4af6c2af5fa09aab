"""Head registry: ``@register_head`` names a head class; ``build_head`` builds one by name.

One file per head, each docstring naming the method notes it implements (docs/methods.md):
meanp, xpool, tefal, avigate, gais, htav. Importing this package imports every module in it
(all but ``base`` are heads), so ``HEADS`` is complete as soon as ``avr.fuse.heads`` is
imported: a head file dropped in here is registered, trained, evaluated and covered by
``tests/fuse/heads/test_contract.py`` with no other edit.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from avr.errors import AvrError
from avr.fuse.fields import typed_fields
from avr.fuse.heads.base import HeadConfig, RetrievalHead
from avr.store.schema import CacheSpec, stored_inputs

HEADS: dict[str, type[RetrievalHead]] = {}


def register_head(name: str):
    def wrap(cls: type[RetrievalHead]) -> type[RetrievalHead]:
        cls.name = name
        HEADS[name] = cls
        return cls

    return wrap


def head_class(name: str) -> type[RetrievalHead]:
    try:
        return HEADS[name]
    except KeyError:
        raise AvrError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}") from None


def make_config(name: str, options: dict[str, Any] | None = None,
                source: str = "head option") -> HeadConfig:
    """The head's config dataclass with ``options`` applied, each converted to its field's type
    (:mod:`avr.fuse.fields`; ``source`` says where they came from in an error); unknown keys
    are an error."""
    cls = head_class(name)
    known = {f.name: f for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise AvrError(f"head {name!r} has no option {', '.join(unknown)}; "
                       f"its options: {', '.join(sorted(known))}")
    return cls.Config(**typed_fields(cls.Config, options or {}, source))


def video_inputs(name: str, *options: dict[str, Any] | None,
                 spec: CacheSpec | None = None) -> tuple[str, ...]:
    """The video arrays head ``name`` reads when built with any of ``options`` (default: its
    default options): the union, in the head's order; of a store of ``spec``, those it holds
    (``schema.stored_inputs``). What a loader shared by those runs loads."""
    cls = head_class(name)
    wanted = {array for opts in (options or ({},)) for array in
              cls.video_inputs_for(make_config(name, opts))}
    names = tuple(array for array in cls.video_inputs if array in wanted)
    return names if spec is None else stored_inputs(names, spec)


def build_head(name: str, spec: CacheSpec, options: dict[str, Any] | None = None) -> RetrievalHead:
    return head_class(name)(spec, make_config(name, options))


def _import_heads() -> None:
    # Importing a head module runs its @register_head; every module here but base is a head.
    # Each imports register_head from this package, defined above, while it is being imported.
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_heads()
