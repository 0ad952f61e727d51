"""Learning-rate schedules and the ISDA strength schedule λ = λ0·t/T, each in one named function.

A schedule is read after `step` of `total` steps; with `total` = 1, `step` is the
fraction t/T of the run done, in [0, 1]. `learning_rate` picks a schedule by name and
is what `train`, `train-gan` and the inverter call.
"""

from __future__ import annotations

import math

from isda_viz.errors import IsdaVizError

SCHEDULES = ("cosine", "step", "linear", "constant")
STEP_MILESTONES = (0.5, 0.75)  # the paper's step schedule: x0.1 at 50% and at 75% of training


def cosine_lr(base: float, step: float, total: float = 1.0) -> float:
    """Cosine annealing: `base` at step 0, `base / 2` half way, 0 at `total`."""
    return 0.5 * base * (1 + math.cos(math.pi * step / total))


def linear_lr(base: float, step: float, total: float = 1.0) -> float:
    """Linear decay from `base` at step 0 to 0 at `total` (and 0 beyond)."""
    return base * max(0.0, 1.0 - step / total)


def step_lr(base: float, decays: int, factor: float = 0.1) -> float:
    """`base · factor^decays`: the rate after `decays` step decays."""
    return base * factor ** decays


def isda_strength(lambda0: float, progress: float) -> float:
    """The ISDA augmentation strength λ = λ0·t/T at `progress` = t/T (paper, Sec. 3.3 and Appendix A)."""
    return lambda0 * progress


def sigmoid_rampup(progress: float, length: float) -> float:
    """Weight in (0, 1] of a consistency term at `progress` = t/T: exp(-5 (1 - t / length)^2) during the first
    `length` fraction of the run, then 1 (the ramp-up of Laine & Aila's Π-model and Tarvainen & Valpola's mean
    teacher). `length` = 0: 1 throughout."""
    if length <= 0 or progress >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - max(progress, 0.0) / length) ** 2)


def learning_rate(schedule: str, base: float, step: float, total: float = 1.0, *,
                  milestones: tuple[float, ...] = STEP_MILESTONES, every: int | None = None) -> float:
    """The learning rate after `step` of `total` steps (or at the fraction `step` of the run, `total` = 1).

    `cosine` and `linear` decay to 0 at `total`; `step` multiplies by 0.1 at each of
    `milestones` (fractions of the run) reached, or, with `every`, once every `every` steps;
    `constant` keeps `base`.
    """
    if schedule == "cosine":
        return cosine_lr(base, step, total)
    if schedule == "linear":
        return linear_lr(base, step, total)
    if schedule == "step":
        decays = step // every if every is not None else sum(step / total >= m for m in milestones)
        return step_lr(base, decays)
    if schedule == "constant":
        return base
    raise IsdaVizError(f"unknown schedule '{schedule}'; choose {', '.join(SCHEDULES)}")
