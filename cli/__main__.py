"""`python -m isda_viz.cli`: the same as the `isda-viz` command."""

from .main import main

main(prog_name="isda-viz")
