"""The `isda-viz` command group, and the one place library errors become one-line CLI errors."""

from __future__ import annotations

import click

from isda_viz._version import __version__
from isda_viz.devices import deterministic_refusal
from isda_viz.errors import IsdaVizError
from isda_viz.runs import write_failure

from .audit import audit_command
from .augment import augment_command, grid_command
from .demo import demo_command
from .directions import directions_command
from .gan import train_gan_command
from .inverter import train_inverter_command
from .plot import plot_command
from .reach import generator_report_command
from .train import train_command


class IsdaVizGroup(click.Group):
    """A command group whose commands' `IsdaVizError`s end as `Error: <message>` on stderr, exit status 1."""
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except IsdaVizError as e:
            raise click.ClickException(str(e)) from None
        except RuntimeError as e:  # --deterministic met an operation without a deterministic kernel
            refusal = deterministic_refusal(e)
            if refusal is None:
                raise
            raise click.ClickException(str(refusal)) from None
        except OSError as e:  # a full disk or a read-only folder met where no `runs.writing` names the file
            error = write_failure(e, e.filename or "an output file")
            if error is None:
                raise
            raise click.ClickException(str(error)) from None


@click.group(cls=IsdaVizGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="isda-viz")
def main():
    """Implicit semantic data augmentation (ISDA): train with it, and see what it augments."""


main.add_command(train_command)
main.add_command(audit_command)
main.add_command(train_gan_command)
main.add_command(augment_command)
main.add_command(grid_command)
main.add_command(demo_command)
main.add_command(plot_command)
main.add_command(directions_command)
main.add_command(train_inverter_command)
main.add_command(generator_report_command)
