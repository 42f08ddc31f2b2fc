"""`--progress`: the steps of a long command with the time left, on stderr.

Not a command module: `user passwd` and `disk create` take `@progress_option` and pass
`reporter(progress)` to their service (keystore.services.progress words the lines).
Shown when stderr is a terminal, or with --progress; never on stdout, so never in --json
output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from keystore.services.progress import Report, silent

F = TypeVar("F", bound=Callable[..., Any])


def progress_option(f: F) -> F:
    return click.option(
        "--progress/--no-progress",
        "progress",
        default=None,
        help="Show each step with the time left, on stderr (default: when stderr is a terminal).",
    )(f)


def reporter(progress: bool | None) -> Report:
    """Where progress lines go: stderr, if asked for or if stderr is a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    return (lambda line: click.echo(line, err=True)) if progress else silent
