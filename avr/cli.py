"""The `avr` command line: a thin typer layer that parses and calls into the stages.

Errors derived from AvrError are printed as one message without a traceback; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

from avr.errors import AvrError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Audio-enhanced text-to-video retrieval: cache features once, "
                       "train fusion heads in seconds.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and export feature caches.")
app.add_typer(cache_app, name="cache")

console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


# ---- stage one: extract and cache ------------------------------------------------------------

# ---- stage two: train and sweep --------------------------------------------------------------

# ---- stage three: eval and search ------------------------------------------------------------

# ---- demo and bench --------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except AvrError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {error}")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:  # click usage errors and the like
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise

