"""Which torch device a command runs on, what that device can do, and the one switch for deterministic runs.

`pick_device` is the one place a `--device` value becomes a `torch.device`: it refuses what cannot run (no
CUDA, `cuda:N` past the GPUs present, a GPU this torch build has no kernels for) with one line saying why,
and says so when CUDA is missing for a reason the user can fix (an old driver) and the default falls back
to the CPU. `ISDA_VIZ_DEVICE` sets the default (the test suite sets it to `cpu`, so a GPU machine runs
the same tests as a CPU one unless `ISDA_VIZ_TEST_DEVICE=cuda`).

`native_bf16(device)` asks the GPU actually used whether it computes in bfloat16 (compute capability 8.0
or later), not whether torch can emulate it. `use_deterministic(device)` is `--deterministic`.
"""

from __future__ import annotations

import os
import re
import sys
import warnings

import torch

from isda_viz.errors import IsdaVizError

DEVICE_ENV = "ISDA_VIZ_DEVICE"
"""Default device when `--device` is not given (`cpu`, `cuda`, `cuda:N`); unset: CUDA when present, else CPU."""

CUBLAS_WORKSPACE = ":4096:8"
"""The cuBLAS workspace setting that makes its matrix products deterministic (CUDA >= 10.2)."""


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _cuda_available() -> tuple[bool, str]:
    """`(available, why not)`: torch warns (and answers False) when the driver is too old or broken; the
    first line of that warning is the reason, "" when there is none (no GPU, or a CPU build of torch)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    reasons = [str(w.message).strip().splitlines()[0] for w in caught if "CUDA" in str(w.message)]
    return available, (reasons[0] if reasons and not available else "")


def _arch_version(arch: str) -> tuple[int, int] | None:
    """`sm_86` → (8, 6), `sm_120` → (12, 0), `compute_90a` → (9, 0); None for anything else."""
    match = re.fullmatch(r"(?:sm|compute)_(\d+)[a-z]*", arch)
    if match is None or len(match.group(1)) < 2:
        return None
    number = match.group(1)
    return int(number[:-1]), int(number[-1])


def has_kernels_for(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """True when a torch build with `arch_list` (`torch.cuda.get_arch_list()`) runs on a GPU of compute
    `capability`: a binary `sm_XY` serves the same major version from minor Y up; PTX `compute_XY` is
    compiled on the spot for any GPU from X.Y up. An empty list (a CPU build) serves nothing."""
    for arch in arch_list:
        version = _arch_version(arch)
        if version is None:
            continue
        if arch.startswith("sm_") and version[0] == capability[0] and version[1] <= capability[1]:
            return True
        if arch.startswith("compute_") and version <= tuple(capability):
            return True
    return False


def _check_cuda_device(dev: torch.device, asked: str, option: str = "--device") -> torch.device:
    """`dev` (type cuda) if it exists and this torch build has kernels for it, else `IsdaVizError` (`option`:
    where the device was asked for)."""
    available, why = _cuda_available()
    if not available:
        raise IsdaVizError(f"{option} {asked} asked for, but CUDA is not available on this machine"
                           + (f" ({why})" if why else ""))
    count = torch.cuda.device_count()
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if not 0 <= index < count:
        raise IsdaVizError(f"{option} {asked}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    capability = tuple(torch.cuda.get_device_capability(index))
    arch_list = torch.cuda.get_arch_list()
    if arch_list and not has_kernels_for(capability, arch_list):
        name = torch.cuda.get_device_name(index)
        raise IsdaVizError(f"cuda:{index} ({name}, compute capability {capability[0]}.{capability[1]}) has no "
                           f"kernels in this torch build ({torch.__version__}, built for "
                           f"{', '.join(arch_list)}); install a torch wheel built for it (see the README's "
                           "'GPUs' section) or use --device cpu")
    return dev


def check_device(device: str | None) -> None:
    """`IsdaVizError` unless `device` is None/`auto`, `cpu`, or `cuda`/`cuda:N` with CUDA present and N one of its
    devices (a device kind this torch cannot compute on, such as `meta`, is refused)."""
    pick_device(device)


def pick_device(device: str | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N`, or None (or `auto`): `$ISDA_VIZ_DEVICE` when set, else CUDA when present and
    usable, else the CPU (with a note naming the reason when CUDA is there but unusable: an old driver, a GPU
    without kernels in this torch build). An explicit CUDA device that cannot run is an `IsdaVizError`."""
    option = "--device"
    if device is None or device == "auto":
        device, option = os.environ.get(DEVICE_ENV) or None, f"${DEVICE_ENV}"
        if device is None or device == "auto":
            available, why = _cuda_available()
            if available:
                try:
                    return _check_cuda_device(torch.device("cuda"), "cuda")
                except IsdaVizError as e:  # e.g. a GPU this torch build has no kernels for: the CPU still works
                    why = str(e).removeprefix("--device cuda: ")
            if why:
                _note(f"CUDA is not available ({why}); running on the CPU")
            return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise IsdaVizError(f"{option}: unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise IsdaVizError(f"{option} {device}: isda-viz runs on cpu or cuda, not {dev.type}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise IsdaVizError(f"{option} {device}: the CPU has no index {dev.index}; use cpu")
    if dev.type == "cuda":
        return _check_cuda_device(dev, device, option)
    return dev


def native_bf16(device: torch.device) -> bool:
    """True when `device` computes in bfloat16 natively: a CUDA GPU of compute capability 8.0 or later (or a
    ROCm GPU). `torch.cuda.is_bf16_supported()` also counts emulation (a T4, sm_75, "supports" bf16 at a
    fraction of fp16's speed) and asks the current device, not `device`."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)


def use_deterministic(device: torch.device | None = None, warn_only: bool = False) -> None:
    """`--deterministic`: the same inputs give bit-identical outputs on this machine, or the op that cannot
    is named. Turns on torch's deterministic algorithms (ops without a deterministic implementation raise
    a RuntimeError naming themselves, or warn with `warn_only`), cuDNN's deterministic kernels without
    benchmarking, full float32 precision in matrix products and convolutions (no TF32) and, for cuBLAS,
    the workspace setting `CUBLAS_WORKSPACE_CONFIG` (set here unless the environment already sets it; it
    must be set before cuBLAS starts, which is why commands call this before building any model).
    Process-wide, as torch's own switches are."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # TF32 off. The allow_tf32 switches exist in every torch this package supports; torch >= 2.9's per-backend
    # `fp32_precision` settings are not mixed in (reading the old switches after setting some new ones raises).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def deterministic() -> bool:
    """True after `use_deterministic` (torch's deterministic algorithms are on)."""
    return torch.are_deterministic_algorithms_enabled()


def use_fast_kernels(device: torch.device) -> None:
    """Outside `--deterministic`, on CUDA: let cuDNN benchmark convolution algorithms for the shapes it meets
    (training sees the same shapes every step); leaves everything as it is on the CPU or when deterministic."""
    if device.type == "cuda" and not deterministic():
        torch.backends.cudnn.benchmark = True


_REFUSAL = re.compile(r"^(\S+) does not have a deterministic implementation")


def deterministic_refusal(error: BaseException) -> IsdaVizError | None:
    """The one-line error for a RuntimeError raised by an op that has no deterministic implementation under
    `--deterministic` (naming the op), else None."""
    match = _REFUSAL.search(str(error).strip())
    if not isinstance(error, RuntimeError) or match is None:
        return None
    return IsdaVizError(f"--deterministic: the operation {match.group(1)} has no deterministic implementation on "
                        "this device; run without --deterministic (results may then differ in the last bits "
                        "between runs) or on the CPU")
