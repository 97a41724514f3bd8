"""The command groups' shared style: plain help text wrapped at 100 columns.

Typer's boxed help cuts option names and defaults in narrow tables (``--no-record-dri…``); click's
plain layout lists each option with its full name and wraps only the description.
"""

from __future__ import annotations

from typing import Any

import typer

HELP_WIDTH = 100


def new_app(help: str, **options: Any) -> typer.Typer:
    """A command group with the package's help style."""
    return typer.Typer(no_args_is_help=True, rich_markup_mode=None, help=help,
                       context_settings={"max_content_width": HELP_WIDTH}, **options)
