"""The typer app every command module registers on, and the shared console."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="primekd",
    help="Knowledge distillation of LLMs with response-priming prompts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class State:
    debug: bool = False


state = State()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state.debug = debug
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, advisory warnings) off the user's screen."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("accelerate").setLevel(logging.ERROR)
