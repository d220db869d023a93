"""`mailfence config ...`: check a settings file and show what it means."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer

from mailfence.cli.common import ConfigOption, load_config, out

app = typer.Typer(
    help="Check the settings file.\n\nExample: mailfence config check", no_args_is_help=True
)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


@app.command("check")
def check(config: ConfigOption = None) -> None:
    """Validate the settings and print the effective configuration as JSON.

    Exits 2 with one line naming the file, the key and the fix when something is wrong.

    Example: mailfence config check --config mailfence.example.toml
    """
    settings = load_config(config)
    out.print(json.dumps(_plain(settings), indent=2), markup=False)
