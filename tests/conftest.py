"""Shared fixtures: tiny classifier runs trained once per test session on real Fashion-MNIST.

The suite runs on the CPU, on a GPU machine too: every `device=None` (and every command without `--device`,
in-process or in a subprocess, which inherit the environment) means `$ISDA_VIZ_DEVICE`, set here to
`$ISDA_VIZ_TEST_DEVICE` or `cpu`. `ISDA_VIZ_TEST_DEVICE=cuda pytest` runs the device-capable tests on CUDA;
tests that need the CPU (gloo process groups) say `device="cpu"` themselves.
"""

from __future__ import annotations

import os

import pytest

from isda_viz.devices import DEVICE_ENV

TEST_DEVICE = os.environ.get("ISDA_VIZ_TEST_DEVICE", "cpu")
os.environ[DEVICE_ENV] = TEST_DEVICE


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
