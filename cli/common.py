"""What every command shares: turning library errors into one-line click errors, and common options."""

from __future__ import annotations

import functools

import click

from isda_viz.errors import IsdaVizError


def user_errors(fn):
    """Run a command body; an `IsdaVizError` becomes `Error: <message>` and exit status 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IsdaVizError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


device_option = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu).")
seed_option = click.option("--seed", default=0, show_default=True, type=int, help="Random seed; same seed, same outputs.")
