"""Run directories: atomic writes, JSON lines, safe checkpoint loading.

A classifier run directory (written by `isda-viz train`) holds
`checkpoint.pt` (plain tensors and dicts: model, optimizer, estimator state,
epoch, config, class names, normalisation, input size; where used, the fp16
gradient scaler, the labeled indices and the mean teacher), `config.json` and
`metrics.jsonl`.
Everything is written to a temporary file in the same folder and renamed into
place, so a kill never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from isda_viz.errors import IsdaVizError

CHECKPOINT = "checkpoint.pt"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets the usual mode
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (what identifies a weights file in caches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_atomic(obj, path) -> None:
    """`torch.save(obj)` to `path` through a temporary file and a rename."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_json_atomic(obj, path) -> None:
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_bytes_atomic(data: bytes, path) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def save_image_atomic(image, path) -> None:
    """Save a PIL image (format from the suffix) atomically."""
    buf = io.BytesIO()
    image.save(buf, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    write_bytes_atomic(buf.getvalue(), path)


def append_jsonl(record: dict, path) -> None:
    """Append one JSON line; a line is one small write, so a kill loses at most that line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return out


def load_checkpoint(path, what: str = "checkpoint") -> dict:
    """`torch.load(path, weights_only=True)`, with one-line errors for missing or corrupt files."""
    path = Path(path)
    if not path.exists():
        raise IsdaVizError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise IsdaVizError(f"{what} {path} is corrupt or not a checkpoint ({type(e).__name__})") from None


def resolve_run_dir(path) -> Path:
    """A run directory, or the checkpoint file inside one."""
    path = Path(path)
    return path.parent if path.is_file() else path


# ------------------------------------------------------------------------------------------------ resuming a run


def open_run_dir(out, checkpoint_name: str, resume: bool, match: dict | None = None,
                 what: str = "checkpoint") -> dict | None:
    """The checkpoint to resume from in the run directory `out`, or None for a fresh run.

    The one resume protocol of `train` and `train-gan`: a folder holding `checkpoint_name`
    is continued only with `resume`; `resume` on a non-empty folder without one is refused;
    the saved run's `config` must agree with `match` (`{key: value}`, e.g. dataset, arch).
    Refusals are `IsdaVizError`s; nothing is written here.
    """
    out = Path(out)
    path = out / checkpoint_name
    if not path.exists():
        if resume and out.exists() and any(out.iterdir()):
            raise IsdaVizError(f"--resume: {out} holds no {checkpoint_name}")
        return None
    if not resume:
        raise IsdaVizError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
    ckpt = load_checkpoint(path, what)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise IsdaVizError(f"{path} is not a {what} of isda-viz; choose another --out")
    for key, value in (match or {}).items():
        if ckpt["config"].get(key) != value:
            raise IsdaVizError(f"{path} holds a run with {key}={ckpt['config'].get(key)}, not {value}; "
                               "choose another --out or match the run")
    return ckpt


def truncate_metrics(path, key: str, last) -> None:
    """Drop the lines of a metrics.jsonl whose `key` (epoch, iteration) is beyond `last`: the lines
    written after the checkpoint being resumed, which the resumed run writes again."""
    kept = [r for r in read_jsonl(path) if r.get(key, 0) <= last]
    write_bytes_atomic("".join(json.dumps(r) + "\n" for r in kept).encode(), path)
