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

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from isda_viz import locks
from isda_viz.errors import IsdaVizError
from isda_viz.readers import read_text

CHECKPOINT = "checkpoint.pt"


# ------------------------------------------------------------------------------------------------ writing

WRITE_FAILURES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOTDIR: "a part of its path is a file, not a folder"}
"""The `OSError`s of a write that are the machine's state, not a bug: each becomes one line naming the path."""


def _bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def write_failure(e: OSError, path, needed: int | None = None) -> IsdaVizError | None:
    """The one-line error for a failed write to `path` (None when `e` is not one of `WRITE_FAILURES`).
    `needed`: the bytes the write needed, where known; a full disk also says how much was free."""
    if e.errno not in WRITE_FAILURES:
        return None
    where = Path(e.filename) if isinstance(e.filename, str) else Path(path)
    detail = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        parts = [f"needed {_bytes(needed)}"] if needed else []
        try:
            parts.append(f"{_bytes(shutil.disk_usage(next(p for p in [where, *where.parents] if p.exists())).free)}"
                         " free")
        except (OSError, StopIteration):
            pass
        detail = f" ({', '.join(parts)})" if parts else ""
    return IsdaVizError(f"cannot write {where}: {WRITE_FAILURES[e.errno]}{detail}")


@contextmanager
def writing(path, needed: int | None = None):
    """Turn a full disk, a read-only file system or a refused permission inside the body into one
    `IsdaVizError` naming `path` (or the file the system names)."""
    try:
        yield
    except OSError as e:
        error = write_failure(e, path, needed)
        if error is None:
            raise
        raise error from None


def private_mkdtemp(parent: Path, prefix: str) -> Path:
    """`tempfile.mkdtemp` beside an output, with the usual folder mode (mkdtemp makes 0700)."""
    with writing(parent):
        Path(parent).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(folder, 0o777 & ~umask)
    return folder


@contextmanager
def assembled_beside(out: Path, maps_to: Path | None = None):
    """A temporary folder `.NAME.tmp.*` beside `out` for the body to fill and publish
    (`outputs.folders.publish_folder`, which may leave the output it replaced there); removed whatever
    happens. Call it holding `out`'s lock (`locks.exclusive`). Errors of writes inside it (a full disk, a
    read-only folder) become one `IsdaVizError` naming the destination (`maps_to`, default `out`) instead of the temporary folder."""
    out = Path(out)
    maps_to = Path(maps_to or out)
    # Left by a killed run of this output: safe to remove, as the caller holds the output's lock (an output
    # moved aside to `.NAME.old.*` by a publication is `outputs.folders`' to put back or remove).
    for stale in out.parent.glob(f".{out.name}.tmp.*") if out.parent.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = private_mkdtemp(out.parent, f".{out.name}.tmp.")
    try:
        yield tmp
    except OSError as e:
        named = Path(e.filename) if isinstance(e.filename, str) else None
        if named is not None and tmp in named.parents:
            named = maps_to / named.relative_to(tmp)
        error = write_failure(e, named or maps_to)
        if error is None:
            raise
        raise error from None
    except IsdaVizError as e:
        raise IsdaVizError(str(e).replace(str(tmp), str(maps_to))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _atomic_write(path: Path, write, needed: int | None = None) -> None:
    path = Path(path)
    with writing(path, needed):
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
    """`torch.save(obj)` to `path` through a temporary file and a rename.

    Serialised in memory first: torch's zip writer reports a failed write (a full disk) as a bare
    RuntimeError, and the size is then known for the message."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(buffer.getbuffer(), path)


def write_json_atomic(obj, path) -> None:
    """`obj` as strict JSON (indented) to `path`, atomically. NaN or an infinity is an `IsdaVizError` naming the
    file, never written: strict JSON has no such numbers, and the readers refuse them."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise IsdaVizError(f"not writing {path}: it would hold a number that is not finite (NaN or inf); an option "
                           "or a model produced it") from None
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_bytes_atomic(data: bytes, path) -> None:
    _atomic_write(Path(path), lambda f: f.write(data), needed=len(data))


def save_image_atomic(image, path) -> None:
    """Save a PIL image (format from the suffix) atomically."""
    buf = io.BytesIO()
    image.save(buf, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"))
    write_bytes_atomic(buf.getvalue(), path)


def append_jsonl(record: dict, path) -> None:
    """Append one JSON line; a line is one small write, so a kill loses at most that line."""
    line = json.dumps(record) + "\n"
    with writing(path, len(line)), open(path, "a") as f:
        f.write(line)


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in read_text(path, "the metrics file", limit=1 << 30).splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return out


# ------------------------------------------------------------------------------------------------ reading


def check_checkpoint_start(path, what: str = "checkpoint") -> None:
    """Refuse, from its first bytes, a file that cannot be a torch checkpoint (before any of it is read).

    Accepted starts: a zip archive (torch >= 1.6), a pickle of protocol 2-5 (torch's legacy format),
    a tar (torch < 0.4, refused later by name) and a safetensors header. Anything else (zeros, text,
    an image) is an `IsdaVizError` showing the bytes.
    """
    path = Path(path)
    if path.is_dir():
        raise IsdaVizError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise IsdaVizError(f"{what} {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise IsdaVizError(f"cannot read {what} {path}: {os.strerror(e.errno)}") from None
    zip_start = head[:4] in (b"PK\x03\x04", b"PK\x05\x06")
    pickle_start = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    tar_start = head[257:262] == b"ustar"
    safetensors_start = len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 27
    if not (zip_start or pickle_start or tar_start or safetensors_start):
        shown = " ".join(f"{b:02x}" for b in head[:8]) or "nothing (the file is empty)"
        raise IsdaVizError(f"{what} {path} is not a torch checkpoint: it starts with {shown}, neither a zip "
                           "archive nor a torch pickle")


def _first_tensor(obj, test, prefix: str = "", depth: int = 0) -> str | None:
    """The dotted name of the first tensor in `obj` (nested dicts, lists, tuples) for which `test` is true."""
    if isinstance(obj, torch.Tensor):
        return (prefix or "tensor") if test(obj) else None
    if depth > 64:
        return prefix or "a value"  # nested deeper than any checkpoint of ours: reported as the culprit
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        name = _first_tensor(value, test, f"{prefix}.{key}" if prefix else str(key), depth + 1)
        if name is not None:
            return name
    return None


def non_dense_tensor(obj) -> str | None:
    """The dotted name of the first tensor in `obj` that is not a dense (strided) one, e.g. sparse, or None."""
    return _first_tensor(obj, lambda t: t.layout != torch.strided)


def non_finite_tensor(obj, prefix: str = "") -> str | None:
    """The dotted name of the first floating-point tensor in `obj` (nested dicts, lists, tuples) holding an
    inf or NaN, or None when every one is finite. Tensors must be dense (`non_dense_tensor` first)."""
    return _first_tensor(obj, lambda t: t.is_floating_point() and not bool(torch.isfinite(t).all()), prefix)


def load_checkpoint(path, what: str = "checkpoint") -> dict:
    """`torch.load(path, weights_only=True)`, with one-line errors for missing, corrupt or non-finite files."""
    path = Path(path)
    if not path.exists():
        raise IsdaVizError(f"{what} not found: {path}")
    check_checkpoint_start(path, what)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise IsdaVizError(f"{what} {path} is corrupt or not a checkpoint ({type(e).__name__})") from None
    bad = non_dense_tensor(ckpt)
    if bad is not None:
        raise IsdaVizError(f"{what} {path} holds a sparse (not dense) tensor {bad}; isda-viz reads dense tensors")
    bad = non_finite_tensor(ckpt)
    if bad is not None:
        raise IsdaVizError(f"{what} {path} holds non-finite values (inf or NaN) in the tensor {bad}")
    return ckpt


def resolve_run_dir(path) -> Path:
    """A run directory, or the checkpoint file inside one."""
    path = Path(path)
    return path.parent if path.is_file() else path


# ------------------------------------------------------------------------------------------------ resuming a run


def open_run_dir(out, checkpoint_name: str, resume: bool, match: dict | None = None,
                 what: str = "checkpoint", read=None) -> dict | None:
    """The checkpoint to resume from in the run directory `out`, or None for a fresh run.

    The one resume protocol of `train` and `train-gan`: a folder holding `checkpoint_name`
    is continued only with `resume`; `resume` on a non-empty folder without one is refused;
    the saved run's `config` must agree with `match` (`{key: value}`, e.g. dataset, arch).
    `read(path)`: the format's validating reader, returning the checkpoint's dict (default
    `load_checkpoint`). Refusals are `IsdaVizError`s; nothing is written here.
    """
    out = Path(out)
    path = out / checkpoint_name
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise IsdaVizError(f"--out {out} is {'a symbolic link' if out.is_symlink() else 'a file'}; give a folder")
    if not path.exists():
        present = sorted(os.listdir(out)) if out.is_dir() else []
        if resume and present:
            raise IsdaVizError(f"--resume: {out} holds no {checkpoint_name}")
        foreign = [name for name in present if not _started_run_entry(out, name, checkpoint_name)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise IsdaVizError(f"--out {out} holds files that are not a run of isda-viz ({shown}); choose another "
                               "--out or empty it")
        return None
    if not resume:
        raise IsdaVizError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
    ckpt = read(path) if read is not None else load_checkpoint(path, what)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise IsdaVizError(f"{path} is not a {what} of isda-viz; choose another --out")
    for key, value in (match or {}).items():
        if ckpt["config"].get(key) != value:
            raise IsdaVizError(f"{path} holds a run with {key}={ckpt['config'].get(key)}, not {value}; "
                               "choose another --out or match the run")
    return ckpt


def _started_run_entry(out: Path, name: str, checkpoint_name: str) -> bool:
    """Whether `name` in a run directory without a checkpoint is what a run killed before its first one leaves:
    our config.json (a JSON object naming the isda-viz version), metrics.jsonl beside it, or a temporary of an
    atomic write of either file."""
    if name == "config.json":
        try:
            if not os.path.isfile(out / name) or os.path.getsize(out / name) > 1 << 16:
                return False
            data = json.loads((out / name).read_bytes())
            return isinstance(data, dict) and "isda_viz_version" in data
        except (OSError, ValueError, RecursionError):
            return False
    if name == "metrics.jsonl":  # ours only beside our config.json
        return os.path.isfile(out / name) and _started_run_entry(out, "config.json", checkpoint_name)
    temporary = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", name)
    return temporary is not None and temporary.group(1) in ("config.json", checkpoint_name)


def truncate_metrics(path, key: str, last) -> None:
    """Drop the lines of a metrics.jsonl whose `key` (epoch, iteration) is beyond `last`: the lines
    written after the checkpoint being resumed, which the resumed run writes again."""
    kept = [r for r in read_jsonl(path) if r.get(key, 0) <= last]
    write_bytes_atomic("".join(json.dumps(r) + "\n" for r in kept).encode(), path)


def _remove_new_entries(out: Path, before: set[str] | None) -> None:
    """Remove what appeared in `out` since `before` (its entries then; None: `out` did not exist)."""
    if not out.is_dir():
        return
    if before is None:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in set(os.listdir(out)) - before:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def guarded_run_dir(out, checkpoint_name: str, enabled: bool = True):
    """Hold the lock on the run directory `out` for the body (`locks.exclusive`); should the body fail
    before the run's first `checkpoint_name` exists, remove what it wrote, so a run that never finished
    an epoch leaves `out` as it was (or absent). `enabled` False (ranks other than 0): do nothing."""
    if not enabled:
        yield
        return
    out = Path(out)
    with locks.exclusive(out):
        before = set(os.listdir(out)) if out.is_dir() else None
        had_checkpoint = (out / checkpoint_name).exists()
        try:
            yield
        except BaseException:
            if not had_checkpoint and not (out / checkpoint_name).exists():
                _remove_new_entries(out, before)
            raise
