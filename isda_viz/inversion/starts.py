"""Where the inversion pipeline's latent codes come from: one small interface, one class per way.

The pipeline (`inversion.pipeline.invert_batch`) solves two problems for a batch of images: Step I, codes z*
whose images reconstruct the inputs (Eq. 20), and Step II, codes whose features reach the targets ã from
there (Eq. 21). A `CodeSource` says where each step starts and how many optimiser steps of the step's own
objective follow (`refinement`, an `InversionOptions`):

* `PriorSearch` (`--inverter search`): Step I from `restarts` draws of the generator's prior per image,
  searched for the options' iterations, the best start kept; Step II from z*. The paper's Appendix E.
* `AmortizedStart` (`--inverter amortized`): both steps from the passes of the pair's trained inverter
  (`inversion.amortized`), then `refine_steps` optimiser steps (0: the inverter alone).

A new way of producing codes (another encoder, a cached solution) is one more subclass.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from isda_viz.inversion.amortized import AmortizedInverter, RenderFeatures, options_dict
from isda_viz.inversion.optimizer import InversionOptions, normalize_latent

REFINE_STEPS = 100
"""Optimiser steps after the amortized passes, in each of Step I and Step II, unless `--refine-steps` says
otherwise (chosen with `bench/inversion.py`: see the README)."""
DIRECTIONS_REFINE_STEPS = 10
"""The demo's directions figure's refinement (its batch is about 11x the grid's)."""
REFINE_LR = {"reconstruct_lr": 0.2, "augment_lr": 0.1}
"""The refinement's peak Adam steps (cosine-decayed): from a close start, Step II settles lower with a
larger step than the search's 0.05 in few steps (`bench/inversion.py`)."""


class CodeSource:
    """A way of producing latent codes for `invert_batch`. `refinement`: the optimiser's options after the
    starts (iterations of Step I and Step II, steps, restarts); `name`: what the report's settings call it."""

    name: str = "source"
    refinement: InversionOptions

    def step1_starts(self, render_features: RenderFeatures, features: torch.Tensor, labels: torch.Tensor,
                     prior: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Step I's starts `(N, R, D)` for images `pixels (N, C, H, W)` (classifier input) with `features (N, A)`,
        `labels (N,)`; `prior (N, R', D)`: the generator's prior draws for this batch (drawn whatever the
        source, so a seed gives the same ã)."""
        raise NotImplementedError

    def step2_starts(self, render_features: RenderFeatures, wanted: torch.Tensor, labels: torch.Tensor,
                     z_star: torch.Tensor, star_features: torch.Tensor) -> torch.Tensor | None:
        """Step II's starts `(N, M, D)` for targets `wanted (N, M, A)` of images with Step I codes `z_star (N, D)`
        and their features `star_features (N, A)`; None: each from its image's z*."""
        raise NotImplementedError

    def settings(self) -> dict:
        """What the report records of this source (JSON values)."""
        return {"inverter": self.name, **options_dict_of(self.refinement)}


def options_dict_of(options: InversionOptions) -> dict:
    return {key: list(v) if isinstance(v, tuple) else v for key, v in vars(options).items()}


class PriorSearch(CodeSource):
    """The search (`--inverter search`): prior draws, then `options`' full schedule."""

    name = "search"

    def __init__(self, options: InversionOptions):
        self.refinement = options

    def step1_starts(self, render_features, features, labels, prior, pixels):
        return prior

    def step2_starts(self, render_features, wanted, labels, z_star, star_features):
        return None


class AmortizedStart(CodeSource):
    """The pair's amortized inverter (`--inverter amortized`), then `refine_steps` optimiser steps per step."""

    name = "amortized"

    def __init__(self, inverter: AmortizedInverter, refine_steps: int = REFINE_STEPS,
                 options: InversionOptions | None = None):
        self.inverter = inverter
        self.refine_steps = refine_steps
        base = options or InversionOptions()
        self.refinement = replace(base, reconstruct_iterations=refine_steps, augment_iterations=refine_steps,
                                  restarts=1, **REFINE_LR)

    def step1_starts(self, render_features, features, labels, prior, pixels):
        z_hat, _ = self.inverter.reconstruct(render_features, features, labels, pixels)
        return z_hat[:, None]

    def step2_starts(self, render_features, wanted, labels, z_star, star_features):
        n, m = wanted.shape[:2]
        z_hat, _ = self.inverter.augment(render_features, wanted.flatten(0, 1), labels.repeat_interleave(m),
                                         normalize_latent(z_star).repeat_interleave(m, 0),
                                         star_features.repeat_interleave(m, 0))
        return z_hat.view(n, m, -1)

    def settings(self) -> dict:
        return {**super().settings(), "refine_steps": self.refine_steps,
                "reconstruct_passes": self.inverter.reconstruct_passes,
                "augment_passes": self.inverter.augment_passes,
                "inverter_options": options_dict(self.inverter.options)}


class FromCodes(CodeSource):
    """Given codes, then `steps` more optimiser steps (e.g. `explore`'s "refine" of the picture on screen):
    Step I from `step1 (N, D)`, Step II from `step2 (N, M, D)` (None: from z*)."""

    name = "codes"

    def __init__(self, step1: torch.Tensor | None, step2: torch.Tensor | None, steps: int,
                 options: InversionOptions | None = None):
        self.codes1, self.codes2, self.refine_steps = step1, step2, steps
        self.refinement = replace(options or InversionOptions(), reconstruct_iterations=steps,
                                  augment_iterations=steps, restarts=1, **REFINE_LR)

    def step1_starts(self, render_features, features, labels, prior, pixels):
        return self.codes1[:, None]

    def step2_starts(self, render_features, wanted, labels, z_star, star_features):
        return self.codes2
