"""`train` and `train-gan` share one resume protocol (`isda_viz.runs.open_run_dir`, `truncate_metrics`):
the same refusals, word for word, and the same cut of metrics.jsonl back to the resumed point."""

import json

import pytest
from click.testing import CliRunner

from isda_viz.cli.main import main

# command line of a tiny run, its checkpoint, the metrics key, options that contradict the saved run
COMMANDS = {
    "train": (["train", "--arch", "resnet8", "--limit-train", 64, "--limit-test", 32, "--batch-size", 32,
               "--epochs", 1], "checkpoint.pt", "epoch", ["--arch", "resnet20"], "arch=resnet8, not resnet20"),
    "train-gan": (["train-gan", "--limit-train", 64, "--batch-size", 8, "--n-critic", 1, "--sample-every", 1,
                   "--iterations", 1], "training_state.pt", "iteration", ["--unconditional"],
                  "conditional=True, not False"),
}


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_refusals_and_metrics_cut_are_those_of_the_shared_helper(command, tmp_path):
    args, checkpoint, key, contradicting, mismatch = COMMANDS[command]
    out = tmp_path / "run"
    assert _invoke(*args, "--out", out).exit_code == 0
    assert (out / checkpoint).is_file()
    metrics = (out / "metrics.jsonl").read_text()
    last = json.loads(metrics.splitlines()[-1])[key]

    assert _error(_invoke(*args, "--out", out)) == (
        f"Error: --out {out} already holds a run; pass --resume to continue it, or choose another --out")
    assert _error(_invoke(*args, *contradicting, "--out", out, "--resume")) == (
        f"Error: {out / checkpoint} holds a run with {mismatch}; choose another --out or match the run")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a run")
    assert _error(_invoke(*args, "--out", other, "--resume")) == f"Error: --resume: {other} holds no {checkpoint}"
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]  # nothing written by a refused run

    # Lines written after the checkpoint (a kill between them), one cut mid-line: the resume drops them.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({key: last + 1, "lost": True}) + "\n" + '{"' + key + '": ')
    result = _invoke(*args, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    assert (out / "metrics.jsonl").read_text() == metrics
