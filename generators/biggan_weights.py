"""Where BigGAN-deep weights come from: names, URLs, caches, download, and strict loading of a weight folder.

Weights are a folder in `pytorch_pretrained_biggan`'s format, `config.json` + `pytorch_model.bin`.
`resolve_biggan` finds one without touching the package's loader, which has traps:

* `BigGAN.from_pretrained` loads with `strict=False`: a truncated or mismatched
  weight file silently leaves random weights. `load_biggan_model` loads strictly, with
  `torch.load(weights_only=True)`, and refuses non-finite weights.
* For a model *name* the package's cache sends a HEAD request even on a cache hit,
  so offline it fails. Names resolve here: our cache, then the package's cache
  (read through its `.json` metadata), then a download where the machine is online.
* The package imports scipy (undeclared) and boto3/requests at import: it is imported
  only when a BigGAN is actually built.
"""

from __future__ import annotations

import io
import os
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from isda_viz.cache import cache_root
from isda_viz.errors import IsdaVizError
from isda_viz.readers import Fields, check_network_size, read_json
from isda_viz.runs import write_bytes_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"
BIGGAN_URL = "https://s3.amazonaws.com/models.huggingface.co/biggan/{name}-{file}"
BIGGAN_NAMES = ("biggan-deep-128", "biggan-deep-256", "biggan-deep-512")


def _urls(name: str) -> dict[str, str]:
    return {CONFIG_NAME: BIGGAN_URL.format(name=name, file="config.json"),
            WEIGHTS_NAME: BIGGAN_URL.format(name=name, file="pytorch_model.bin")}


def biggan_cache_dir() -> Path:
    """Where downloaded BigGAN weights go: `$ISDA_VIZ_CACHE/biggan` (default `~/.cache/isda-viz/biggan`)."""
    return cache_root() / "biggan"


def _package_cache_copy(name: str) -> dict[str, Path] | None:
    """The files of `name` in pytorch_pretrained_biggan's own cache, found by the URL in each `.json` sidecar."""
    root = Path(os.environ.get("PYTORCH_PRETRAINED_BIGGAN_CACHE", Path.home() / ".pytorch_pretrained_biggan"))
    if not root.is_dir():
        return None
    wanted = {url: file for file, url in _urls(name).items()}
    found: dict[str, Path] = {}
    for meta in root.glob("*.json"):
        try:
            url = read_json(meta, "a pytorch-pretrained-biggan cache entry", limit=1 << 16).get("url")
        except (IsdaVizError, AttributeError):
            continue
        data = meta.with_suffix("")
        if url in wanted and data.is_file():
            found[wanted[url]] = data
    return found if len(found) == 2 else None


def _download(name: str, target: Path, timeout: float = 30.0) -> None:
    """Fetch config and weights of `name` into `target` (each file lands whole or not at all)."""
    for file, url in _urls(name).items():
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            chunks = []
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name} {file}") as bar:
                while chunk := response.read(1 << 20):
                    chunks.append(chunk)
                    bar.update(len(chunk))
        write_bytes_atomic(b"".join(chunks), target / file)


def resolve_biggan(spec: str, allow_download: bool | None = None) -> dict[str, Path]:
    """`{"config.json": path, "pytorch_model.bin": path}` for a local folder or a model name.

    A folder must hold both files. A name (`biggan-deep-128|256|512`) is looked up
    in `biggan_cache_dir()`, then in the package's cache, then downloaded into `biggan_cache_dir()`
    unless `allow_download` is False (default: allowed unless `ISDA_VIZ_OFFLINE=1`).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        files = {f: path / f for f in (CONFIG_NAME, WEIGHTS_NAME)}
        missing = [f for f, p in files.items() if not p.is_file()]
        if missing:
            raise IsdaVizError(f"BigGAN folder {path} has no {' and no '.join(missing)} "
                               f"(a BigGAN folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
        return files
    if spec not in BIGGAN_NAMES:
        raise IsdaVizError(f"'{spec}' is neither a folder nor a BigGAN name ({', '.join(BIGGAN_NAMES)})")
    ours = biggan_cache_dir() / spec
    if all((ours / f).is_file() for f in (CONFIG_NAME, WEIGHTS_NAME)):
        return {f: ours / f for f in (CONFIG_NAME, WEIGHTS_NAME)}
    theirs = _package_cache_copy(spec)
    if theirs:
        return theirs
    if allow_download is None:
        allow_download = os.environ.get("ISDA_VIZ_OFFLINE", "") not in ("1", "true", "yes")
    hint = (f"download {_urls(spec)[CONFIG_NAME]} and {_urls(spec)[WEIGHTS_NAME]} as {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} into a folder and pass that folder as --generator PATH")
    if not allow_download:
        raise IsdaVizError(f"BigGAN weights '{spec}' are not in {ours} and downloads are off; {hint}")
    try:
        _download(spec, ours)
    except OSError as e:  # URLError, timeouts, refused connections, disk errors
        reason = getattr(e, "reason", None) or e
        raise IsdaVizError(f"BigGAN weights '{spec}' are not in {ours} and could not be downloaded ({reason}); "
                           f"{hint}") from None
    return {f: ours / f for f in (CONFIG_NAME, WEIGHTS_NAME)}


def _build(config_path: Path):
    try:
        from pytorch_pretrained_biggan import BigGAN, BigGANConfig
    except ImportError as e:
        raise IsdaVizError(f"BigGAN needs pytorch-pretrained-biggan (and scipy): {e}") from None
    config = BigGANConfig.from_dict(read_biggan_config(config_path))
    check_network_size(lambda: BigGAN(config), f"the BigGAN config {config_path}")
    try:
        return BigGAN(config)
    except (OSError, ValueError, TypeError, KeyError, IndexError) as e:
        raise IsdaVizError(f"{config_path} is not a BigGAN config ({type(e).__name__}: {e})") from None


def read_biggan_config(path: Path) -> dict:
    """A BigGAN `config.json` (pytorch_pretrained_biggan's `BigGANConfig` fields), checked as it is read: at most
    1 MB of strict JSON, each field of its type and in range (`readers.Fields`); unknown keys are dropped."""
    fields = Fields(read_json(path, "BigGAN config", limit=1 << 20), f"the BigGAN config {path}")
    config = {"output_dim": fields.integer("output_dim", 16, 2048, default=128),
              "z_dim": fields.integer("z_dim", 1, 4096, default=128),
              "class_embed_dim": fields.integer("class_embed_dim", 1, 4096, default=128),
              "channel_width": fields.integer("channel_width", 1, 4096, default=128),
              "num_classes": fields.integer("num_classes", 1, 100_000, default=1000),
              "eps": fields.number("eps", 1e-12, 1.0, default=1e-4),
              "n_stats": fields.integer("n_stats", 1, 1000, default=51)}
    if "layers" in fields.data:
        layers = fields.items("layers", list, max_length=64)
        if not layers:
            fields.fail("layers", "must name at least one layer")
        for i, layer in enumerate(layers):
            if not (len(layer) == 3 and isinstance(layer[0], bool) and all(
                    isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64 for v in layer[1:])):
                fields.fail("layers", f"item {i} must be [upsample (true/false), in, out] (widths 1-64)")
        config["layers"] = [tuple(layer) for layer in layers]
    config["attention_layer_position"] = fields.integer("attention_layer_position", 0,
                                                        len(config.get("layers", [None] * 10)), default=8)
    return config


def load_biggan_model(spec: str):
    """The `pytorch_pretrained_biggan.BigGAN` of a folder or a model name (see `resolve_biggan`), loaded strictly."""
    files = resolve_biggan(str(spec))
    model = _build(files[CONFIG_NAME])
    weights = files[WEIGHTS_NAME]
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise IsdaVizError(f"BigGAN weights {weights} are corrupt or not a weight file ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise IsdaVizError(f"BigGAN weights {weights} hold no state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise IsdaVizError(f"BigGAN weights {weights} do not match {files[CONFIG_NAME]} "
                           f"({str(e).splitlines()[1 if len(str(e).splitlines()) > 1 else 0].strip()[:160]})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise IsdaVizError(f"BigGAN weights {weights} hold non-finite values (e.g. {bad[0]})")
    return model


def save_biggan(model, folder) -> None:
    """Write a `pytorch_pretrained_biggan.BigGAN` as `folder/config.json` + `folder/pytorch_model.bin`."""
    folder = Path(folder)
    write_bytes_atomic(model.config.to_json_string().encode(), folder / CONFIG_NAME)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    write_bytes_atomic(buf.getvalue(), folder / WEIGHTS_NAME)
