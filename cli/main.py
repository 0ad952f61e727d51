"""The `isda-viz` command group, and the one place library errors become one-line CLI errors."""

from __future__ import annotations

import sys

import click
from tqdm import tqdm

from isda_viz._version import __version__
from isda_viz.devices import deterministic_refusal
from isda_viz.errors import IsdaVizError
from isda_viz.runs import write_failure

from .audit import audit_command
from .augment import augment_command, grid_command
from .demo import demo_command
from .directions import directions_command
from .explore import explore_command
from .gan import train_gan_command
from .inverter import train_inverter_command
from .plot import plot_command
from .reach import generator_report_command
from .train import train_command


class _LineTracker:
    """Stands in for stderr during a command and remembers whether the last thing written ended a line, so that
    an error after a progress bar (which redraws its line with `\r`) starts a line of its own."""

    def __init__(self, stream):
        self.stream, self.at_line_start = stream, True

    def write(self, text):
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _end_progress_line(tracker: _LineTracker) -> None:
    """Close the progress bars still open and end their line: the `Error:` that follows stands on its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    if not tracker.at_line_start:
        tracker.stream.write("\n")
        tracker.stream.flush()


class IsdaVizGroup(click.Group):
    """A command group whose commands' `IsdaVizError`s end as `Error: <message>` on stderr (on a line of its own,
    after any progress bar), exit status 1."""
    def invoke(self, ctx: click.Context):
        tracker = _LineTracker(sys.stderr)
        sys.stderr = tracker
        try:
            return super().invoke(ctx)
        except IsdaVizError as e:
            _end_progress_line(tracker)
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
            _end_progress_line(tracker)
            raise click.ClickException(str(error)) from None
        finally:
            sys.stderr = tracker.stream


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
main.add_command(explore_command)
