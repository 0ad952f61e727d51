"""The ranges options are checked against where they enter, and the seeds the code derives from `--seed`.

Every option is finite and in a stated range before any work (the options dataclasses'
`__post_init__`, and click's types on the command line); what several options multiply into
(the rows of one inversion batch, the draws of the semantic test) is checked against
`memory_budget()` before the first model is run, naming the options to lower.
"""

from __future__ import annotations

import math
import os

from isda_viz.errors import IsdaVizError

MAX_SEED = 2**63 - 1
MEMORY_ENV = "ISDA_VIZ_MEMORY_GB"
DEFAULT_MEMORY_GB = 16.0


def check_seed(seed, option: str = "--seed") -> int:
    """`seed` as an int in 0..2**63 - 1 (what torch, numpy and the derived seeds all take)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise IsdaVizError(f"{option} must be an integer from 0 to 2**63 - 1, not {seed}")
    return seed


def derived_seed(value: int) -> int:
    """A seed the code derives from `--seed` (seed + 1, seed * 100003 + epoch, ...) brought into 0..2**63 - 1;
    the same value for every seed whose derivation already is (so results of small seeds do not change)."""
    return value % (MAX_SEED + 1)


def check_number(value, option: str, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`); `IsdaVizError` naming `option`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise IsdaVizError(f"{option} must be a finite number in {bracket}{low:g}, {high:g}], not {value}")
    return float(value)


def check_count(value, option: str, low: int, high: int) -> int:
    """`value` as an int in [low, high]; `IsdaVizError` naming `option`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise IsdaVizError(f"{option} must be an integer from {low} to {high}, not {value}")
    return value


def memory_budget() -> float:
    """Bytes one command may plan to hold: `$ISDA_VIZ_MEMORY_GB` (default 16) GB."""
    text = os.environ.get(MEMORY_ENV)
    try:
        gb = float(text) if text else DEFAULT_MEMORY_GB
    except ValueError:
        raise IsdaVizError(f"{MEMORY_ENV}={text} is not a number of gigabytes") from None
    if not math.isfinite(gb) or gb <= 0:
        raise IsdaVizError(f"{MEMORY_ENV}={text} must be a positive number of gigabytes")
    return gb * 1e9


def check_memory(needed: float, what: str, lower: str) -> None:
    """Refuse, before any work, a plan whose `needed` bytes exceed `memory_budget()`; `what` says what needs
    them, `lower` which options make it smaller."""
    budget = memory_budget()
    if needed > budget:
        raise IsdaVizError(f"{what} would need about {needed / 1e9:.1f} GB, more than the {budget / 1e9:.0f} GB "
                           f"budget ({MEMORY_ENV}); lower {lower}")
