"""The `prefixserve` command."""

from __future__ import annotations

import logging

import typer

from prefixserve import __version__

app = typer.Typer(help="prefixserve: serve prefix-tuned language models.", no_args_is_help=True)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Run the HTTP server. Every flag is also an env var: --max-batch-size 8 = PREFIXSERVE_MAX_BATCH_SIZE=8.

    Run `prefixserve serve --help` for the full list.
    """
    import uvicorn
    from pydantic import ValidationError

    from prefixserve.api.app import create_app
    from prefixserve.config import Settings
    from prefixserve.logging_setup import setup_logging
    from prefixserve.runtime import build_runtime

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
    runtime = build_runtime(settings)
    uvicorn.run(
        create_app(runtime),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=30,
    )


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    app()
