"""Shared fixtures: tiny classifier runs trained once per test session on real Fashion-MNIST."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """An ISDA ResNet-8 trained for one epoch on 1024 Fashion-MNIST images (a few seconds)."""
    from isda_viz.training.loop import TrainConfig, fit

    out = tmp_path_factory.mktemp("runs") / "isda"
    fit(TrainConfig(out=str(out), arch="resnet8", epochs=1, limit_train=1024, limit_test=256, batch_size=64),
        progress=False, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def tiny_ce_run(tmp_path_factory):
    """A cross-entropy ResNet-8 (another seed), the 'judge' in inversion tests."""
    from isda_viz.training.loop import TrainConfig, fit

    out = tmp_path_factory.mktemp("runs") / "ce"
    fit(TrainConfig(out=str(out), arch="resnet8", loss="ce", seed=1, epochs=1, limit_train=1024, limit_test=256,
                    batch_size=64), progress=False, log=lambda *a: None)
    return out
