"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from isda_viz.errors import IsdaVizError


def check_device(device: str | None) -> None:
    """`IsdaVizError` unless `device` is None/`auto`, `cpu`, or `cuda`/`cuda:N` with CUDA present and N one of its
    devices (a device kind this torch cannot compute on, such as `meta`, is refused)."""
    pick_device(device)


def pick_device(device: str | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N`, or None (or `auto`) for CUDA when present else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise IsdaVizError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise IsdaVizError(f"--device {device}: isda-viz runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IsdaVizError(f"--device {device} asked for, but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise IsdaVizError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise IsdaVizError(f"--device {device}: the CPU has no index {dev.index}; use cpu")
    return dev
