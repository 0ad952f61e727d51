"""What the pipelines write: typed reports (report.json / FIG.json), figures, HTML pages, plots."""

from isda_viz.outputs.report import Report, read_report

__all__ = ["Report", "read_report"]
