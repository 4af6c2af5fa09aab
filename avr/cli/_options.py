"""Options and checks shared by the commands: each declared once here, so that a flag reads and
behaves the same on every command that takes it.

A check runs as a typer callback: its AvrError becomes a usage error (typer's short usage
message, exit status 2) before any work starts. Heavy modules are imported inside the checks, so
that ``avr --help`` stays fast.
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from avr.errors import AvrError

DEVICE_HELP = "auto | cpu | cuda | cuda:N."
# avr.store.schema.COMPRESSIONS, without importing numpy here (a test checks they agree)
COMPRESSIONS = ("zstd", "lz4", "none")
COMPRESSION_HELP = ("Codecs of a new store's chunks, each with a crc32c checksum: zstd (smallest), "
                    "lz4 (decodes faster), none (fastest to stream). A resumed store keeps its "
                    "own.")
BUDGET_HELP = ("GB of cached arrays held on the host and the device (default: what fits, with "
               "headroom); a train split beyond it streams from the store.")
RESIDENT_HELP = ("fp16: token arrays held as stored (default) | int8: with a per-token fp16 "
                 "scale, dequantized per batch on the device (about half the bytes).")
STORE_HELP = "The store: a path or a URL."


def checked(check):
    """An option callback that runs ``check(value)`` on a given value; its AvrError becomes a
    usage error, shown by typer before any work starts."""
    def callback(value):
        if value is not None:
            try:
                check(value)
            except AvrError as error:
                raise typer.BadParameter(str(error)) from None
        return value

    return callback


def choose(value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AvrError(f"{value!r} is not one of {', '.join(choices)}")


def one_of(*choices: str):
    return checked(lambda value: choose(value, choices))


def _positive(value: float) -> None:
    if not value > 0:
        raise AvrError(f"{value} must be > 0")


def _device(name: str) -> None:
    from avr.device import resolve_device

    resolve_device(name)


def _head(name: str) -> None:
    from avr.fuse.heads import head_class

    head_class(name)


positive = checked(_positive)
known_head = checked(_head)


def names(value: str) -> list[str]:
    """A comma-separated list, blanks dropped."""
    return [name.strip() for name in value.split(",") if name.strip()]


# ---- options declared once ---------------------------------------------------------------------

def device(default: Optional[str] = "auto") -> Any:
    return typer.Option(default, help=DEVICE_HELP, callback=checked(_device))


def memory_budget(help: str = BUDGET_HELP) -> Any:
    return typer.Option(None, "--memory-budget", help=help, callback=positive)


def resident(default: Optional[str] = None, help: str = RESIDENT_HELP) -> Any:
    return typer.Option(default, "--resident", help=help, callback=one_of("fp16", "int8"))


def compression() -> Any:
    return typer.Option("zstd", "--compression", help=COMPRESSION_HELP,
                        callback=one_of(*COMPRESSIONS))


def chunk_rows() -> Any:
    return typer.Option(None, "--chunk-rows", min=1, help="Video rows per chunk and per write.")


def overwrite() -> Any:
    return typer.Option(False, "--overwrite", help="Replace a store made with other settings.")


def opts(help: str) -> Any:
    return typer.Option([], "--opt", "--option", help=help)


def store_argument() -> Any:
    return typer.Argument(None, metavar="STORE", show_default=False,
                          help=STORE_HELP + " Or --cache (default: cache).")


def store_option() -> Any:
    return typer.Option(None, "--cache", help=STORE_HELP + " The same as the STORE argument.")


def json_flag() -> Any:
    return typer.Option(False, "--json", help="Print the result as JSON to stdout.")


def print_json(data: Any) -> None:
    """``data`` as JSON on stdout, alone (scripts parse it), whatever the console's state:
    non-finite numbers as null (JSON has none), other objects as their text."""
    import json
    import math
    import sys

    def plain(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    sys.stdout.write(json.dumps(plain(data), indent=2, default=str) + "\n")


def the_store(argument: Optional[str], option: Optional[str],
              default: Optional[str] = "cache") -> Optional[str]:
    """The store a `cache` or `index` command works on: its STORE argument or ``--cache`` (one
    of them, or the same value twice), else ``default``."""
    if argument is not None and option is not None and argument != option:
        raise AvrError(f"the store is given twice ({argument} and --cache {option}): give one")
    return option or argument or default
