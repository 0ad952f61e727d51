"""`isda-viz explore`: the live explorer, served until Ctrl-C."""

from __future__ import annotations

import signal

import click

from isda_viz.app.explore import DEFAULT_PORT, ExploreOptions, explore

from .augment import visualize_options


@click.command("explore")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True,
              help="Port to serve on (0: a free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: 127.0.0.1 serves this machine only; anything else serves the network "
                   "(a warning says so).")
@click.option("--directions", "num_directions", type=int, default=5, show_default=True,
              help="Sliders: the top eigen-directions of the image's class covariance.")
@click.option("--per-class", type=int, default=4, show_default=True, help="Test images per class to pick from.")
@click.option("--classes", default=None, help="Comma-separated class names or indices to pick from (default: all).")
@click.option("--save-dir", type=click.Path(file_okay=False), default="explore-saves", show_default=True,
              help="Folder the page's \"save\" writes into (one augment-style folder per save).")
@visualize_options
def explore_command(port, host, num_directions, per_class, classes, save_dir, options):
    """Move along ISDA's directions and watch the picture change, live, in a browser (Ctrl-C stops it).
    --strength is λ's start and --refine-steps the refinement of each slider picture (default 0: the amortized
    inverter alone; the page's "refine" adds more)."""
    chosen = [c.strip() for c in classes.split(",")] if classes else None
    app = explore(ExploreOptions(visualize=options, directions=num_directions, per_class=per_class, classes=chosen,
                                 save_dir=save_dir, host=host, port=port))
    for note in app.session.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"isda-viz explore: {app.url} (Ctrl-C stops it; saves go to {save_dir}/)")
    signal.signal(signal.SIGTERM, lambda *_: app.stop())
    try:
        app.wait()
    except KeyboardInterrupt:
        pass
    click.echo("stopped")
