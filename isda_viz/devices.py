"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from isda_viz.errors import IsdaVizError


def pick_device(device: str | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N`, or None (or `auto`) for CUDA when present else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise IsdaVizError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IsdaVizError(f"--device {device} asked for, but CUDA is not available on this machine")
    return dev
