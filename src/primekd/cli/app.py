"""The typer app every command module registers on, and the shared console."""

from __future__ import annotations

import logging
import os
import warnings

import typer
from rich.console import Console

from primekd import __version__

app = typer.Typer(
    name="primekd",
    help="Knowledge distillation of LLMs with response-priming prompts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: `[...]` and `[vllm]` stay as written
)
console = Console()
err_console = Console(stderr=True)


class State:
    debug: bool = False


state = State()


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"primekd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the primekd version and exit."),
) -> None:
    state.debug = debug
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, advisory warnings) off the user's screen."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Read by transformers and huggingface_hub when first imported; importing them here
    # instead would cost commands that never load a model (grade, compare) about a second.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
