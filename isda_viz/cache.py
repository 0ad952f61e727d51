"""Where isda-viz keeps downloads and derived data: `$ISDA_VIZ_CACHE`, default `~/.cache/isda-viz`.

Read at call time (an in-process change of the variable moves every cache at once), and checked
when a cache folder is about to be written: a root that is a file, read-only or unreachable is
one `IsdaVizError` naming it and the variable that moves it. `module_fingerprint` identifies a network
that did not come from one weights file (a generator), for the keys of what is derived from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from isda_viz.errors import IsdaVizError

CACHE_ENV = "ISDA_VIZ_CACHE"


def cache_root() -> Path:
    """`$ISDA_VIZ_CACHE`, else `$HOME/.cache/isda-viz` (not created here)."""
    value = os.environ.get(CACHE_ENV)
    if value:
        return Path(value).expanduser()
    home = os.environ.get("HOME")
    if not home:
        try:
            home = str(Path.home())
        except (RuntimeError, KeyError):  # no HOME and no password entry for this user
            raise IsdaVizError(f"no cache folder: HOME is not set and this user has no home folder; set "
                               f"{CACHE_ENV} to a writable folder") from None
    return Path(home) / ".cache" / "isda-viz"


def _unusable(folder: Path) -> str | None:
    """Why `folder` cannot hold cache files, or None when it can (creating it if need be)."""
    for parent in [folder, *folder.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return f"{parent} is not a folder"
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{e.filename or folder} cannot be written ({os.strerror(e.errno) if e.errno else e})"
    return None


def cache_dir(*parts: str, create: bool = True) -> Path:
    """`cache_root() / parts`, created and checked writable when `create`."""
    folder = cache_root().joinpath(*parts)
    if create:
        why = _unusable(folder)
        if why is not None:
            source = f"{CACHE_ENV}={os.environ[CACHE_ENV]}" if os.environ.get(CACHE_ENV) else "the default under HOME"
            raise IsdaVizError(f"the cache folder {folder} ({source}) is unusable: {why}; set {CACHE_ENV} to a "
                               "writable folder")
    return folder


def module_fingerprint(module: torch.nn.Module, extra: dict | None = None) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes of every parameter and buffer) and `extra`:
    what identifies a network when it did not come from one weights file (e.g. a generator)."""
    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)   # 1-d: a 0-d tensor has no byte view
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
