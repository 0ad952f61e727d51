"""What the pipelines write: typed reports (report.json / FIG.json, audit.json, summary.json), figures,
HTML pages, plots."""

from isda_viz.outputs import html, report
from isda_viz.outputs.report import Report, read_report

# A written report shows its page in Jupyter (report.py itself imports nothing of the page it is shown as).
report.set_notebook_view(lambda path: html.html_fragment(path, embed=True))

__all__ = ["Report", "read_report"]
