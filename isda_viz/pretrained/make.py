"""Turn finished runs into the shipped weights: float16 tensors, no optimiser state, and provenance.

    python -m isda_viz.pretrained.make --classifier runs/fmnist-isda --judge runs/fmnist-ce \
        --generator runs/fmnist-gan [--commit HASH]
    python -m isda_viz.pretrained.make --inverter      # the shipped pair's amortized inverter (train-inverter)

Each run is copied as its own command wrote it, minus what only resuming needs
(optimiser, critic), with floating-point weights in float16; the estimator's
float64 statistics are kept as they are (they are small for A = 64). Beside it,
`provenance.json` records the command that made the run (from its config.json),
its seed, the commit it was trained from, the wall time and the final metrics,
and the sha256 of the file shipped. Nothing here edits a weight.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

from isda_viz.classifiers.run_checkpoint import read_run_checkpoint
from isda_viz.generators.wgan_train import GanConfig
from isda_viz.pretrained import CLASSIFIER, GENERATOR, HERE, JUDGE
from isda_viz.runs import load_checkpoint, read_jsonl, save_atomic, write_json_atomic
from isda_viz.training.loop import TrainConfig


def _half(state: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _command(kind: str, config: dict, defaults) -> str:
    """The command line that reproduces the run: the options whose saved values differ from the defaults."""
    skip = {"out", "device", "isda_viz_version", "torch", "workers", "image_size"}
    parts = [f"isda-viz {kind}"]
    for key, value in config.items():
        if key in skip or value is None or value == getattr(defaults, key, object()):
            continue
        if key == "conditional":
            parts.append("--unconditional")
            continue
        parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts + [f"--out {config['out']}"])


def ship_classifier(run_dir: Path, name: str, commit: str, note: str | None = None) -> Path:
    run = read_run_checkpoint(run_dir / "checkpoint.pt")
    shipped = {k: v for k, v in run.state.items() if k != "optimizer"}
    shipped["model"] = _half(run.model)
    folder = HERE / name
    save_atomic(shipped, folder / "checkpoint.pt")
    history = read_jsonl(run_dir / "metrics.jsonl")
    config = json.loads((run_dir / "config.json").read_text())
    write_json_atomic({
        "made_by": _command("train", {**config, "out": str(run_dir)}, TrainConfig(out="")),
        "seed": config["seed"], "commit": commit, "epochs": run.epoch,
        "wall_seconds": round(sum(r["seconds"] for r in history), 1),
        "metrics": history[-1], "history": history, "float16": True, "note": note,
        "sha256": {"checkpoint.pt": _sha256(folder / "checkpoint.pt")},
    }, folder / "provenance.json")
    return folder


def ship_generator(gan_dir: Path, name: str, commit: str, note: str | None = None) -> Path:
    ckpt = load_checkpoint(gan_dir / "generator.pt")
    shipped = {**ckpt, "state_dict": _half(ckpt["state_dict"])}
    folder = HERE / name
    save_atomic(shipped, folder / "generator.pt")
    history = read_jsonl(gan_dir / "metrics.jsonl")
    config = json.loads((gan_dir / "config.json").read_text())
    agreement = [r for r in history if r.get("agreement") is not None]
    write_json_atomic({
        "made_by": _command("train-gan", {**config, "out": str(gan_dir)}, GanConfig(out="")),
        "seed": config.get("seed"), "commit": commit, "iterations": ckpt.get("iteration"),
        "wall_seconds": history[-1]["seconds"] if history else None,
        "metrics": agreement[-1] if agreement else (history[-1] if history else {}),
        "agreement_curve": [{"iteration": r["iteration"], "seconds": r["seconds"], "agreement": r["agreement"]}
                            for r in agreement],
        "float16": True, "note": note, "sha256": {"generator.pt": _sha256(folder / "generator.pt")},
    }, folder / "provenance.json")
    (folder / "samples.png").write_bytes((gan_dir / "samples.png").read_bytes()) \
        if (gan_dir / "samples.png").exists() else None
    return folder


def ship_inverter(commit: str, note: str | None = None) -> Path:
    """Train (or read) the shipped pair's amortized inverter as `isda-viz train-inverter` does, then store its
    weights in float16 (read back as float32) with provenance beside it in the classifier's `inverters/`."""
    from isda_viz.inversion.amortized import options_dict
    from isda_viz.inversion.pipelines import make_inverter
    inverter, path = make_inverter()
    state = load_checkpoint(path, "inverter")
    save_atomic({**state, "state_dict": _half(state["state_dict"])}, path)
    write_json_atomic({
        "made_by": "isda-viz train-inverter", "commit": commit, "file": path.name,
        "wall_seconds": inverter.info.get("seconds"), "final_loss": inverter.info.get("final_loss"),
        "options": options_dict(inverter.options), "float16": True, "note": note,
        "sha256": {path.name: _sha256(path)},
    }, path.parent / "provenance.json")
    return path.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", type=Path)
    parser.add_argument("--judge", type=Path)
    parser.add_argument("--generator", type=Path)
    parser.add_argument("--inverter", action="store_true", help="Ship the shipped pair's amortized inverter.")
    parser.add_argument("--commit", default=None, help="Commit the runs were trained from (default: HEAD).")
    parser.add_argument("--note", action="append", default=[], metavar="KIND=TEXT",
                        help="A remark for one weight's provenance (KIND: classifier, judge or generator).")
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    notes = dict(n.split("=", 1) for n in args.note)
    for kind, path, name, ship in (("classifier", args.classifier, CLASSIFIER, ship_classifier),
                                   ("judge", args.judge, JUDGE, ship_classifier),
                                   ("generator", args.generator, GENERATOR, ship_generator)):
        if path:
            folder = ship(path, name, commit, notes.get(kind))
            size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            print(f"shipped {path} → {folder} ({size:.2f} MiB)")
    if args.inverter:
        folder = ship_inverter(commit, notes.get("inverter"))
        print(f"shipped the amortized inverter → {folder}")


if __name__ == "__main__":
    main()
