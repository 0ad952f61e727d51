"""Bounded, validated reading of the files users hand us: the pieces every format reader is built from.

Each format (run checkpoint, class-statistics cache, timm or BigGAN `config.json`, class maps and
name files, covariance files, reports, output manifests) has one typed reader; these are what they
share, so that every one of them

* reads only regular files: a named pipe, a device, a folder or a link loop is refused from its
  `stat`, before any byte is read (a FIFO opened for reading would block forever);
* is bounded: a file larger than the format can be is refused from its size, JSON nested deeper
  than `MAX_DEPTH` from a scan of its brackets (before Python's parser recurses);
* is strict: JSON with NaN, Infinity, numbers beyond float64 or repeated keys is refused, text
  must be UTF-8;
* fails with one `IsdaVizError` naming the file and what is wrong with it.

`Fields` checks the values of a decoded JSON object (types, ranges, finiteness) with messages of
the same kind; `check_tensor` does the same for a tensor as it will be used (dtype, layout, shape,
finite in the dtype it is cast to).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import types
import typing
from pathlib import Path

import torch

from isda_viz.errors import IsdaVizError

KB, MB = 1 << 10, 1 << 20
MAX_JSON_BYTES = 16 * MB     # a config.json, class map or report is kilobytes; a long audit.json a few MB
MAX_TEXT_BYTES = 16 * MB
MAX_DEPTH = 32               # nesting of the JSON files we read is 5 at most
MAX_CLASSES = 100_000        # classes a classifier or generator may name


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n / KB:.1f} KB" if n >= KB else f"{n} bytes"


def regular_file(path, what: str, limit: int | None = None) -> Path:
    """`path` as a Path, after checking (without opening it) that it is a regular file (links followed) of at
    most `limit` bytes; else an `IsdaVizError` naming it as `what` ("--class-map", "the run checkpoint")."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise IsdaVizError(f"{what} not found: {path}") from None
    except OSError as e:
        raise IsdaVizError(f"cannot read {what} {path}: {os.strerror(e.errno) if e.errno else e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise IsdaVizError(f"{what} {path} is {_kind(info.st_mode)}, not a file")
    if limit is not None and info.st_size > limit:
        raise IsdaVizError(f"{what} {path} is {_size(info.st_size)}, more than the {_size(limit)} such a file "
                           "can be")
    return path


def read_bytes(path, what: str, limit: int) -> bytes:
    """The bytes of the regular file `path` (at most `limit`): opened without blocking and checked as opened,
    so a file swapped for a FIFO after a check cannot hang the read."""
    path = regular_file(path, what, limit)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise IsdaVizError(f"cannot read {what} {path}: {os.strerror(e.errno)}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IsdaVizError(f"{what} {path} is {_kind(info.st_mode)}, not a file")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise IsdaVizError(f"cannot read {what} {path}: {os.strerror(e.errno)}") from None
    if len(data) > limit:
        raise IsdaVizError(f"{what} {path} is more than the {_size(limit)} such a file can be")
    return data


def decode_utf8(data: bytes, path, what: str) -> str:
    """`data` as UTF-8 text; an `IsdaVizError` naming the first bad byte otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IsdaVizError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                           "save it as UTF-8") from None


def read_text(path, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 text file of at most `limit` bytes."""
    return decode_utf8(read_bytes(path, what, limit), path, what)


def json_depth(text: str) -> int:
    """The deepest nesting of `[` and `{` in JSON `text` (brackets inside strings are skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is beyond float64")
    return value


def _unique_keys(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def parse_json(text: str, path, what: str, max_depth: int = MAX_DEPTH):
    """Strict JSON: no NaN/Infinity, numbers within float64 (and integers within 4300 digits), no repeated
    keys, nesting at most `max_depth`; an `IsdaVizError` naming `path` otherwise."""
    depth = json_depth(text)
    if depth > max_depth:
        raise IsdaVizError(f"{what} {path} nests {depth} levels deep, more than the {max_depth} it can")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise IsdaVizError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise IsdaVizError(f"{what} {path} is not valid JSON ({e})") from None


def read_json(path, what: str, limit: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH):
    """The strict JSON value of a UTF-8 file of at most `limit` bytes (see `parse_json`)."""
    return parse_json(read_text(path, what, limit), path, what, max_depth)


# ------------------------------------------------------------------------------------------------ values

_MISSING = object()


class Fields:
    """The checked values of one decoded JSON object (or a checkpoint's dict): each getter returns the value
    of a key when it has the type and range asked for, else raises one `IsdaVizError` naming `where` (the
    file) and the key. `default`: returned when the key is absent (without it, a missing key is an error)."""

    def __init__(self, data, where: str, what: str = "an object", prefix: str = ""):
        if not isinstance(data, dict):
            raise IsdaVizError(f"{where}{': ' + prefix if prefix else ''} is {_type_name(data)}, not {what}")
        self.data, self.where, self.prefix = data, where, prefix

    def name(self, key) -> str:
        """How messages name `key`: its dotted path from the top of the file."""
        return f"{self.prefix}.{key}" if self.prefix else str(key)

    def _get(self, key: str, default):
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise IsdaVizError(f"{self.where}: {self.name(key)} is missing")
        return default

    def fail(self, key: str, message: str):
        raise IsdaVizError(f"{self.where}: {self.name(key)} {message}")

    def integer(self, key: str, low: int | None = None, high: int | None = None, default=_MISSING):
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, not {_shown(value)}")
        _check_range(self, key, value, low, high)
        return value

    def number(self, key: str, low: float | None = None, high: float | None = None, default=_MISSING):
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, f"must be a finite number, not {_shown(value)}")
        _check_range(self, key, value, low, high)
        return float(value)

    def text(self, key: str, default=_MISSING, max_length: int = 4096):
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {_shown(value)}")
        if len(value) > max_length:
            self.fail(key, f"is {len(value)} characters long, more than {max_length}")
        return value

    def flag(self, key: str, default=_MISSING):
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {_shown(value)}")
        return value

    def mapping(self, key: str, default=_MISSING) -> "Fields":
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        return Fields(value, self.where, "an object", self.name(key))

    def items(self, key: str, kind: type | tuple, default=_MISSING, length: int | None = None,
              max_length: int = 1_000_000) -> list:
        """A list whose items are all of `kind` (bools are not numbers; floats must be finite)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            self.fail(key, f"must be a list, not {_shown(value)}")
        if length is not None and len(value) != length:
            self.fail(key, f"must hold {length} items, not {len(value)}")
        if len(value) > max_length:
            self.fail(key, f"holds {len(value)} items, more than {max_length}")
        for i, item in enumerate(value):
            if not _is(item, kind):
                self.fail(key, f"item {i} is {_shown(item)}, not {_kind_name(kind)}")
        return list(value)


def _is(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, kinds)


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                        list: "a list", dict: "an object"}.get(k, k.__name__) for k in kinds)


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


def _shown(value) -> str:
    if isinstance(value, (dict, list)):
        return _type_name(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_range(fields: Fields, key: str, value, low, high) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if low is not None and high is not None else \
            f">= {low}" if low is not None else f"<= {high}"
        fields.fail(key, f"must be {bounds}, not {_shown(value)}")


def check_class_names(names, where: str) -> list[str]:
    """`names` as a list of distinct non-empty strings (at most MAX_CLASSES); `IsdaVizError` naming `where`."""
    if not isinstance(names, (list, tuple)) or not names or len(names) > MAX_CLASSES:
        raise IsdaVizError(f"{where} must be a list of 1 to {MAX_CLASSES} class names")
    if not all(isinstance(n, str) and n and len(n) <= 1000 for n in names):
        raise IsdaVizError(f"{where} must hold only names (non-empty strings)")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise IsdaVizError(f"{where} names {name!r} twice (classes {seen[name]} and {i}); every class needs "
                               "its own name")
        seen[name] = i
    return list(names)


def build_typed(kind, value, where: str, at: str = ""):
    """`value` (decoded JSON) as the type `kind`, checked all the way down: dataclasses (their required fields
    present, unknown keys ignored, `path` never read), `list[X]`, `dict[str, X]`, `X | None`, and plain `int`
    (not bool), `float` (an int or a finite float), `str`, `bool`, bare `dict`/`list`. The one builder of the
    typed report files (report.json, FIG.json, audit.json, summary.json); a mismatch is an `IsdaVizError`
    naming `where` and the key path."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    name = at or "the top level"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return build_typed(option, value, where, at)
            except IsdaVizError as e:
                errors.append(e)
        raise errors[0]
    if origin is list or kind is list:
        if not isinstance(value, list):
            raise IsdaVizError(f"{where}: {name} must be a list, not {_shown(value)}")
        return [build_typed(args[0], v, where, f"{at}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise IsdaVizError(f"{where}: {name} must be an object, not {_shown(value)}")
        return {k: build_typed(args[1], v, where, f"{at}.{k}" if at else k) for k, v in value.items()} \
            if args else dict(value)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise IsdaVizError(f"{where}: {name} must be an object ({kind.__name__}), not {_shown(value)}")
        hints = typing.get_type_hints(kind)
        built = {}
        for f in dataclasses.fields(kind):
            if not f.init or f.name == "path":
                continue
            key = f"{at}.{f.name}" if at else f.name
            if f.name in value:
                built[f.name] = build_typed(hints[f.name], value[f.name], where, key)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise IsdaVizError(f"{where}: {key} is missing")
        return kind(**built)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise IsdaVizError(f"{where}: {name} must be a finite number, not {_shown(value)}")
        return float(value)
    if kind in (int, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise IsdaVizError(f"{where}: {name} must be {_kind_name(kind)}, not {_shown(value)}")
        return value
    if kind is typing.Any or kind is object:
        return value
    raise IsdaVizError(f"internal: no reader for the type {kind} at {name} of {where}")


def check_relative_files(paths, where: str) -> None:
    """Refuse file names (from a report) that are absolute or climb out of the report's folder with `..`."""
    for path in paths:
        parts = Path(path).parts
        if not parts or Path(path).is_absolute() or ".." in parts:
            raise IsdaVizError(f"{where}: it names the file {path!r}, which is not a path inside its folder")


# ------------------------------------------------------------------------------------------------ tensors


def check_tensor(value, where: str, *, shape: tuple | None = None, ndim: int | None = None,
                 dtype: torch.dtype | None = torch.float32, finite: bool = True,
                 max_elements: int = 1 << 31) -> torch.Tensor:
    """`value` as a dense tensor in `dtype` (None: as it is), checked: a torch tensor, strided (not sparse),
    of `shape` (None entries match any size) or `ndim`, at most `max_elements`, and with `finite` every value
    finite *after* the cast (1e40 is finite in float64 but inf in float32). `IsdaVizError` naming `where`."""
    if not isinstance(value, torch.Tensor):
        raise IsdaVizError(f"{where} is {_type_name(value)}, not a tensor")
    if value.layout != torch.strided:
        raise IsdaVizError(f"{where} is a sparse tensor ({value.layout}); give a dense one")
    if value.is_complex() or (dtype is not None and dtype.is_floating_point and not
                              (value.is_floating_point() or value.dtype in (torch.int8, torch.int16, torch.int32,
                                                                            torch.int64, torch.uint8))):
        raise IsdaVizError(f"{where} holds {value.dtype} values, not real numbers")
    if value.numel() > max_elements:
        raise IsdaVizError(f"{where} holds {value.numel()} values, more than {max_elements}")
    if ndim is not None and value.dim() != ndim:
        raise IsdaVizError(f"{where} has shape {tuple(value.shape)}, not {ndim} dimensions")
    if shape is not None and (value.dim() != len(shape) or
                              any(want is not None and got != want for got, want in zip(value.shape, shape))):
        wanted = "(" + ", ".join("·" if s is None else str(s) for s in shape) + ")"
        raise IsdaVizError(f"{where} has shape {tuple(value.shape)}, not {wanted}")
    if dtype is not None:
        value = value.to(dtype)
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        cast = f" as {str(dtype).replace('torch.', '')}" if dtype is not None else ""
        raise IsdaVizError(f"{where} holds values that are not finite{cast} (inf or NaN)")
    return value


# ------------------------------------------------------------------------------------------------ networks

MAX_PARAMETERS = 2_000_000_000   # 8 GB of float32 weights: beyond it a config asks for more than any machine holds


def check_network_size(build, where: str, limit: int = MAX_PARAMETERS) -> None:
    """Build the network `build()` makes on torch's meta device (no memory) and refuse it, naming `where`, when it
    has more than `limit` parameters: a config's widths are checked before a real network is allocated."""
    try:
        with torch.device("meta"):
            net = build()
    except IsdaVizError:
        raise
    except Exception as e:  # the config does not build at all: the real build says so in its own words
        raise IsdaVizError(f"{where} does not describe a network ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else ''})") from None
    count = sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())
    if count > limit:
        raise IsdaVizError(f"{where} describes a network of {count:,} parameters, more than the {limit:,} "
                           "isda-viz builds (check its widths)")
