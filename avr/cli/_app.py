"""The typer application every command module registers on, its consoles and the root options.

Help is click's plain layout (``rich_markup_mode=None``): flags read as flags, and help text with
brackets (``[captions x videos]``) prints as written. ``-h`` is ``--help`` on every command.
"""

from __future__ import annotations

import typer
from rich.console import Console
from typer.core import TyperCommand

from avr import __version__

CONTEXT = {"help_option_names": ["-h", "--help"]}


class Command(TyperCommand):
    """A typer command whose usage errors all show its usage lines: click raises "Option
    '--lr' requires an argument" from its parser without the command's context, which typer then
    prints as a bare ``Error:`` line."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except Exception as error:  # click's UsageError, from whichever click typer is built on
            if getattr(error, "ctx", False) is None:
                error.ctx = ctx
            raise


class Group(typer.Typer):
    """A typer app whose commands are ``Command``s."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


def command_group(help: str, **settings) -> typer.Typer:
    """A typer app (the root or a group of commands) with avr's help settings."""
    return Group(rich_markup_mode=None, context_settings=CONTEXT, no_args_is_help=True,
                 add_completion=False, help=help, **settings)


app = command_group("Audio-enhanced text-to-video retrieval: cache features once, train fusion "
                    "heads in seconds.")
console = Console()
err_console = Console(stderr=True)
state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        print(f"avr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          version: bool = typer.Option(False, "--version", is_eager=True,
                                       callback=_print_version, help="Print avr's version.")):
    state["debug"] = debug
