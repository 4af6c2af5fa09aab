"""The typer application every command module registers on, its consoles and the root options."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Audio-enhanced text-to-video retrieval: cache features once, "
                       "train fusion heads in seconds.")
console = Console()
err_console = Console(stderr=True)
state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    state["debug"] = debug
