"""The `prefixserve` command."""

from __future__ import annotations

import logging
import os

import typer

from prefixserve import __version__
from prefixserve.training.cli import train_command

app = typer.Typer(help="prefixserve: serve prefix-tuned language models.", no_args_is_help=True)

# OpenMP workers that go to sleep between the ~1,000 small ops of a decode step pay a wake-up for each: a
# token took 18.7 ms instead of 12.7 on 2 cores (bench/RESULTS.md). Spinning is bounded (~tens of ms), so an
# idle server sleeps. Read by libgomp when torch loads, so set before any import of torch; a user's own
# values win.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "20000000"}


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Run the HTTP server. Every flag is also an env var: --max-batch-size 8 = PREFIXSERVE_MAX_BATCH_SIZE=8.

    Run `prefixserve serve --help` for the full list.
    """
    for name, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from pydantic import ValidationError

    from prefixserve.api.auth import KeyFileError
    from prefixserve.config import Settings
    from prefixserve.engine.errors import UnsupportedModelError
    from prefixserve.logging_setup import setup_logging
    from prefixserve.server import StartupError, run

    try:
        settings = Settings(_cli_parse_args=list(ctx.args))
    except ValidationError as exc:
        for err in exc.errors():
            field = (
                "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-") if err["loc"] else "settings"
            )
            typer.echo(f"invalid configuration: {field}: {err['msg']}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.json_logs)
    try:
        run(settings)
    except (StartupError, KeyFileError, UnsupportedModelError) as exc:
        typer.echo(f"prefixserve: {exc}", err=True)
        raise typer.Exit(2) from None


app.command("train")(train_command)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    app()
