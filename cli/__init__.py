"""The `isda-viz` command line: thin click commands over the library (installed as `isda_viz.cli`)."""
