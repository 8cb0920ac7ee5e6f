"""The `prefixserve` command."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import typer

from prefixserve import __version__
from prefixserve.training.cli import train_command

if TYPE_CHECKING:
    from prefixserve.config import Settings

# Click's plain help (rich_markup_mode=None): it wraps descriptions to the terminal and never cuts an
# option name short, where rich's help tables truncated `train`'s long option names at 80 and 120 columns.
app = typer.Typer(
    help="prefixserve: serve prefix-tuned language models.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},  # click's default stops at 80 even on a wider terminal
)

# OpenMP workers that go to sleep between the ~1,000 small ops of a decode step pay a wake-up for each: a
# token took 18.7 ms instead of 12.7 on 2 cores (bench/RESULTS.md). Spinning is bounded (~tens of ms), so an
# idle server sleeps. THP_MEM_ALLOC_ENABLE: torch puts tensors of 2 MB and more (the weights, the KV pool) on
# transparent huge pages, so a decode step, which streams every weight from memory, misses the TLB once per
# 2 MB instead of once per 4 KB (Qwen2.5-0.5B shape, bf16: 16 rows 50.8 -> 49.6 ms a step, 64 rows 75.4 ->
# 73.5, three alternated runs each). Read by libgomp and torch when they load and first allocate, so set
# before any import of torch; a user's own values win.
RUNTIME_DEFAULTS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "20000000", "THP_MEM_ALLOC_ENABLE": "1"}


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Run the HTTP server. Every flag is also an env var: --max-batch-size 8 = PREFIXSERVE_MAX_BATCH_SIZE=8.

    Run `prefixserve serve --help` for the full list.
    """
    if "--help" in ctx.args or "-h" in ctx.args:
        from prefixserve.settings_help import settings_help

        typer.echo(settings_help(), nl=False)
        return
    for name, value in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(name, value)
    settings = _parse_settings(ctx.args)
    from prefixserve.logging_setup import setup_logging
    from prefixserve.startup import (
        PRELOADED_MARK,
        StartupError,
        bind_socket,
        check_adapter_store,
        locate_model,
        preload_tcmalloc,
    )

    setup_logging(settings.json_logs)
    try:
        # Both before torch is imported and the model loaded: a busy port or a wrong --model fails at once.
        sock = bind_socket(settings.host, settings.port)
        locate_model(settings.model, f"http://{settings.host}:{settings.port}")
        check_adapter_store(settings.adapter_dir)
        preload_tcmalloc(settings.malloc, sock)  # may restart the process (which checks all this again)
        if os.environ.get(PRELOADED_MARK):
            logging.getLogger(__name__).info("memory allocator: tcmalloc (preloaded)")
        from prefixserve.adapters.errors import StoreError
        from prefixserve.api.auth import KeyFileError
        from prefixserve.engine.errors import ModelLoadError, UnsupportedModelError
        from prefixserve.server import run

        try:
            run(settings, sock)
        except (KeyFileError, UnsupportedModelError, ModelLoadError, StoreError) as exc:
            raise StartupError(str(exc)) from None
    except StartupError as exc:
        typer.echo(f"prefixserve: {exc}", err=True)
        raise typer.Exit(2) from None


def _parse_settings(args: list[str]) -> Settings:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from prefixserve.config import Settings

    try:
        return Settings(_cli_parse_args=list(args))
    except SettingsError as exc:
        typer.echo(f"prefixserve serve: {_cli_error(str(exc), Settings)}", err=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        for err in exc.errors():
            field = (
                "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-") if err["loc"] else "settings"
            )
            typer.echo(f"invalid configuration: {field}: {err['msg']}", err=True)
        raise typer.Exit(2) from None


def _cli_error(message: str, settings: type[Settings]) -> str:
    """argparse's complaint, with the nearest real flag for a misspelt one and where the list is."""
    import difflib
    import re

    message = message.removeprefix("error parsing CLI: ")
    flags = ["--" + name.replace("_", "-") for name in settings.model_fields]
    flags += [
        "--no-" + f[2:]
        for f, field in zip(flags, settings.model_fields.values(), strict=True)
        if field.annotation is bool
    ]
    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown:
        flag = unknown.group(1).split("=", 1)[0]
        near = difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
        message = f"unknown flag {flag}" + (f" (did you mean {near[0]}?)" if near else "")
    return f"{message}; `prefixserve serve --help` lists every setting"


app.command("train")(train_command)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    app()
