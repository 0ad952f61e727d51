"""`isda-viz explore`: move along ISDA's directions and watch the picture change, live, in a browser or notebook.

A small local web app over the inversion pipeline (`isda_viz.inversion.pipeline`): `session` (the model work:
open, move, draw, refine, save), `worker` (one model thread, slider requests coalesced to the latest
position), `server` (the standard library's HTTP server, JSON routes, the page in `static/`), `explore` (the
options, the running app object, `explore()`).
"""

from isda_viz.app.explore import ExploreApp, ExploreOptions, explore
from isda_viz.app.session import ExploreSession

__all__ = ["ExploreApp", "ExploreOptions", "ExploreSession", "explore"]
