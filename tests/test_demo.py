"""`isda-viz demo --quick` end to end: every stage's files, the summary, and reuse on a second call."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from isda_viz.cli.main import main
from isda_viz.demo import run_demo
from isda_viz.errors import IsdaVizError


def test_quick_demo_from_scratch_runs_every_stage_then_reuses_them(tmp_path):
    out = tmp_path / "demo"
    first = CliRunner().invoke(main, ["demo", "--quick", "--from-scratch", "--out", str(out)])
    assert first.exit_code == 0, first.output
    for stage in ("[classifier] training", "[judge] training", "[generator] training", "[grid]", "[audit]"):
        assert stage in first.output
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["classifier_test_accuracy"] <= 1 and 0 < summary["judge_test_accuracy"] <= 1
    assert summary["audit_queries"] == 10 * 2 + 10  # 2 augmented + 1 reconstruction per class
    assert 0 <= summary["audit_flagged_copies"] <= summary["audit_queries"]
    assert set(summary["seconds"]) >= {"train_classifier", "train_judge", "train_generator", "grid", "audit"}
    figure = json.loads((out / "figure.json").read_text())
    assert sorted(r["label"] for r in figure["images"]) == list(range(10))
    assert Image.open(out / "figure.png").width > 500
    audit = json.loads((out / "audit" / "audit.json").read_text())
    assert len(audit["queries"]) == summary["audit_queries"] and (out / "audit" / "audit.png").exists()
    assert "step I median feature error" in first.output and str(out / "summary.json") in first.output
    for page in (out / "index.html", out / "figure.html", out / "audit" / "index.html"):   # each stage's page
        assert "<table" in page.read_text(encoding="utf-8")
    assert f"page: {out / 'index.html'}" in first.output
    directions = json.loads((out / "directions.json").read_text())        # the directions figure and its test
    assert (out / "directions.png").is_file() and (out / "directions.html").is_file()
    assert summary["semantic_feature_isda"] == directions["test"]["overall_feature"]["isda"]["rate"]
    assert 'src="directions.png"' in (out / "index.html").read_text(encoding="utf-8")

    second = CliRunner().invoke(main, ["demo", "--quick", "--from-scratch", "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert second.output.count("reusing") == 6
    again = json.loads((out / "summary.json").read_text())
    assert again["step1_median_feature_error"] == summary["step1_median_feature_error"]
    assert again["seconds"] == summary["seconds"]


def test_run_demo_refuses_a_file_as_its_folder(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    with pytest.raises(IsdaVizError, match="is a file; give a folder"):
        run_demo(taken, device="cpu", quick=True)
    assert taken.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [taken]
