"""What every command shares: one console, and bad settings or input reported as usage errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from pydantic_settings import BaseSettings
from rich.console import Console

from driftloop.settings import SettingsError, load_settings

console = Console()
S = TypeVar("S", bound=BaseSettings)

USAGE_ERROR = 2
"""The exit code of a command refused its settings or input (as typer's own usage errors)."""


@contextmanager
def usage_errors(*errors: type[Exception]) -> Iterator[None]:
    """Turn a ``SettingsError`` (or one of ``errors``) into its message and exit code 2."""
    refused: tuple[type[Exception], ...] = (SettingsError, *errors)
    try:
        yield
    except refused as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(USAGE_ERROR) from None


def settings_or_exit(settings_class: type[S]) -> S:
    """The settings from the environment and .env, or exit 2 saying which value is wrong."""
    with usage_errors():
        return load_settings(settings_class)
