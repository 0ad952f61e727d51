"""Every command's bad input through the installed `isda-viz` console script: one `Error:` line, nothing written.

The error boundary is the command group (`isda_viz.cli.main`), so this runs the real entry point in a
subprocess rather than click's test runner. Each case runs in an empty working folder, which must
still be empty afterwards (no output folder, no temporary sibling).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(sys.executable).parent / "isda-viz"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("L", (28, 28), 128).save(folder / "image.png")
    (folder / "empty").mkdir()                              # neither a run nor any kind of generator weights
    (folder / "corrupt").mkdir()
    (folder / "corrupt" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    return folder


def _run(args: list, cwd: Path, tmp_path: Path, **env) -> str:
    environment = {**os.environ, "ISDA_VIZ_OFFLINE": "1", "ISDA_VIZ_CACHE": str(tmp_path / "cache"),
                   "PYTORCH_PRETRAINED_BIGGAN_CACHE": str(tmp_path / "biggan-cache"), "OMP_NUM_THREADS": "1",
                   **env}
    result = subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


CASES = {
    # augment and grid: the models they load (every one was a traceback before the CLI had one boundary)
    "augment, --classifier at a folder with no run": (
        ["augment", "--image", "{in}/image.png", "--classifier", "{in}/empty", "--out", "out"],
        {}, "no classifier run at"),
    "grid, --classifier at a folder with no run": (
        ["grid", "--classifier", "{in}/empty", "--out", "fig.png"], {}, "no classifier run at"),
    "augment, --generator at a folder with no weights": (
        ["augment", "--image", "{in}/image.png", "--generator", "{in}/empty", "--out", "out"], {}, "holds neither"),
    "grid, --generator at a folder with no weights": (
        ["grid", "--generator", "{in}/empty", "--out", "fig.png"], {}, "holds neither"),
    "augment, --generator biggan-deep-128 offline": (
        ["augment", "--image", "{in}/image.png", "--generator", "biggan-deep-128", "--truncation", "0.4",
         "--out", "out"], {}, "downloads are off"),
    "grid, --device cuda without CUDA": (
        ["grid", "--device", "cuda", "--out", "fig.png"], {"CUDA_VISIBLE_DEVICES": ""}, "CUDA is not available"),
    "augment, --judge at a missing run": (
        ["augment", "--image", "{in}/image.png", "--judge", "{in}/nothing", "--out", "out"], {}, "nothing"),
    "grid, --classes Nope": (
        ["grid", "--classes", "Sneaker,Nope", "--out", "fig.png"], {}, "--classes Nope is not a class"),
    "augment, --optimizer sgd without --lr": (
        ["augment", "--image", "{in}/image.png", "--optimizer", "sgd", "--out", "out"], {}, "needs --lr"),
    "augment, a missing image": (
        ["augment", "--image", "{in}/missing.png", "--out", "out"], {}, "not found"),
    # the other commands' own checks
    "train, a missing --data-root": (
        ["train", "--data-root", "{in}/nowhere", "--out", "run"], {}, "does not exist"),
    "train --resume, a corrupt checkpoint": (
        ["train", "--resume", "--limit-train", "64", "--out", "{in}/corrupt"], {}, "corrupt"),
    "train-gan, a missing --data-root": (
        ["train-gan", "--data-root", "{in}/nowhere", "--out", "gan"], {}, "does not exist"),
    "audit, a missing query image": (
        ["audit", "--images", "{in}/missing.png", "--dataset", "fashion-mnist", "--out", "audit"], {}, "not found"),
    "augment, --classifier FILE that is no checkpoint of its --classifier-arch": (
        ["augment", "--image", "{in}/image.png", "--classifier", "{in}/corrupt/checkpoint.pt",
         "--classifier-arch", "resnet32", "--out", "out"], {}, "checkpoint.pt"),
    "train --amp bf16 on a CPU": (
        ["train", "--amp", "bf16", "--device", "cpu", "--limit-train", "64", "--out", "run"], {}, "needs a CUDA device"),
    "plot, a folder that is no run": (
        ["plot", "{in}/empty", "--out", "fig.png"], {}, "empty"),
    "demo, --device cuda without CUDA": (
        ["demo", "--device", "cuda", "--out", "demo"], {"CUDA_VISIBLE_DEVICES": ""}, "CUDA is not available"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_leaves_nothing(case, inputs, tmp_path):
    args, env, fragment = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in inputs.rglob("*"))
    line = _run([a.replace("{in}", str(inputs)) for a in args], work, tmp_path, **env)
    assert fragment in line, line
    assert not any(work.iterdir()), sorted(p.name for p in work.iterdir())
    assert sorted(p.name for p in inputs.rglob("*")) == before


def test_python_dash_m_runs_the_same_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "isda_viz.cli", "grid", "--classes", "Nope", "--out", "f.png"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stderr.strip().startswith("Error: --classes Nope"), result.stderr
    assert not any(tmp_path.iterdir())
