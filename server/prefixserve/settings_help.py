"""`prefixserve serve --help`: every setting as a flag with its type, default and environment variable.

Written from `Settings` here rather than left to pydantic-settings' own help, which spells optional values
`{str,null}` and defaults `(default: null)`. argparse lays it out and wraps it to the terminal's width.
"""

from __future__ import annotations

import argparse
import shutil
import textwrap
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from prefixserve.adapters.locations import S3Location
from prefixserve.config import SECTIONS, Settings

USAGE_TAIL = (
    "Every flag is also an environment variable: --max-batch-size 8 = PREFIXSERVE_MAX_BATCH_SIZE=8; flags win. "
    "Start with no flags to serve the built-in demo model on http://127.0.0.1:8000 "
    "(web console at /console, API docs at /docs)."
)


def _plain_type(annotation: Any) -> Any:
    """`int | None` → int: whether a setting may be unset is said by its default, not by its type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def metavar(field: FieldInfo) -> str | None:
    kind = _plain_type(field.annotation)
    if typing.get_origin(kind) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "{" + ",".join(str(m.value) for m in kind) + "}"
    if kind == S3Location | Path:
        return "PATH|s3://BUCKET/PREFIX"
    names = {int: "N", float: "NUMBER", Path: "PATH", str: "TEXT"}
    return names.get(kind, "VALUE") if kind is not bool else None


def flag_help(field: FieldInfo, env: str) -> str:
    text = (field.description or "").rstrip()
    if field.default not in (None, PydanticUndefined) and field.annotation is not bool:
        text += f" Default: {field.default}."
    return f"{text} [{env}]".replace("%", "%%")


class _Formatter(argparse.HelpFormatter):
    """argparse's layout, without breaking words at hyphens (`adapter-store`, `built-in`)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )


def settings_help(width: int | None = None) -> str:
    width = width or shutil.get_terminal_size().columns
    parser = argparse.ArgumentParser(
        prog="prefixserve serve",
        description="Run the HTTP server.",
        epilog=USAGE_TAIL,
        usage="prefixserve serve [--flag value ...]",
        add_help=False,
        formatter_class=lambda prog: _Formatter(prog, width=width, max_help_position=34),
    )
    parser.add_argument("-h", "--help", action="store_true", help="Show this message and exit.")
    fields = Settings.model_fields
    for title, names in SECTIONS.items():
        group = parser.add_argument_group(title)
        for name in names:
            field = fields[name]
            flag = "--" + name.replace("_", "-")
            env = Settings.model_config["env_prefix"] + name.upper()
            if field.annotation is bool:
                group.add_argument(flag, "--no-" + flag[2:], action="store_true", help=flag_help(field, env))
            else:
                group.add_argument(flag, metavar=metavar(field), help=flag_help(field, env))
    return parser.format_help()
