"""The `avr` command line: a thin typer layer that parses, calls one library function and renders.

One module per command group (``extract``; ``store``: cache and index; ``train``: train and
sweep; ``evaluate``: eval and search; ``demo``: demo and bench), options shared by them in
``_options``. Usage errors (an unknown option, a value of the wrong type or out of range, a
missing argument) are typer's own: its short usage message and exit status 2, before any work
starts. An AvrError is printed as one ``error:`` line without a traceback (exit status 2);
``--debug`` shows the traceback. Every option that names a store takes a path or a URL
(``s3://bucket/cache``, ``file:///data/cache``), resolved by ``avr.store.location``.
"""

from __future__ import annotations

import sys
from typing import Optional

from rich.markup import escape

# Importing a command module registers its commands, in the order `avr --help` lists them.
from avr.cli import extract, store, train, evaluate, demo  # noqa: F401, I001
from avr.cli._app import app, err_console, state
from avr.allocator import keep_freed_memory
from avr.errors import AvrError

__all__ = ["app", "main"]


def main(argv: Optional[list[str]] = None) -> None:
    """The `avr` console script. typer runs the command in its standalone mode, so a usage error
    is shown its usual way (short usage, the problem, exit status 2) whichever click typer is
    built on (its vendored copy or the click package); an AvrError prints one line and exits 2.
    Returns normally when the command succeeds, so tests and scripts can call it. Run as the
    process's own command (no ``argv``: the console script, ``python -m avr``), freed memory
    stays in the process for the next training step (``avr.allocator``)."""
    args = _eval_json_path(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        keep_freed_memory()
    try:
        try:
            app(args=args)
        except Exception as error:
            from avr.store.location import remote_failure

            remote = remote_failure(error)  # a store at a URL unreachable: one line too
            if remote is None:
                raise
            raise remote from error
    except AvrError as error:
        if state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True,
                          highlight=False, emoji=False)
        sys.exit(2)
    except SystemExit as done:
        if done.code not in (0, None):
            raise


def _eval_json_path(args: list[str]) -> list[str]:
    """`avr eval --json PATH`, from when --json took the file to write: PATH now goes to
    --json-out (``--json`` alone prints the metrics), with a note on stderr."""
    if "eval" not in args:
        return args
    for i in range(args.index("eval") + 1, len(args) - 1):
        if args[i] == "--json" and not args[i + 1].startswith("-"):
            err_console.print(f"note: `--json {args[i + 1]}` is now `--json-out "
                              f"{args[i + 1]}` (--json alone prints the metrics)",
                              highlight=False, soft_wrap=True)
            return [*args[:i], "--json-out", *args[i + 1:]]
    return args
