"""A plain (non-editable) `pip install .` gives a working package and console script outside the repo."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_non_editable_install_works_outside_the_repo(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    assert not (target / "generators").exists() and not (target / "cli").exists()  # one namespace only
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    probe = ("import isda_viz, isda_viz.generators.wgan_train, isda_viz.cli.main, isda_viz.pretrained as p; "
             "print(isda_viz.__file__); print(sorted(x.name for x in p.HERE.iterdir() if x.is_dir())); "
             "print(sorted(x.name for x in (p.HERE / p.CLASSIFIER / 'generator-reports').iterdir()))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=outside, env=env, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert out[0].startswith(str(target))  # imported from the installed copy, not the repo
    shipped = sorted(p.name for p in (REPO / "isda_viz" / "pretrained").iterdir()
                     if p.is_dir() and p.name != "__pycache__")
    assert [name for name in eval(out[1]) if name != "__pycache__"] == shipped  # weights are package data
    reports = sorted(p.name for p in (REPO / "isda_viz" / "pretrained" / "fmnist-isda-resnet32" / "generator-reports")
                     .iterdir())
    assert eval(out[2]) == reports and reports  # and the shipped pair's generator report
    script = subprocess.run([sys.executable, str(target / "bin" / "isda-viz"), "--help"], cwd=outside, env=env,
                            capture_output=True, text=True)
    assert script.returncode == 0 and "train-gan" in script.stdout and "audit" in script.stdout
