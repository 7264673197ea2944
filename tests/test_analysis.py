"""``hclafter analyze``: probes per block beside the trained stages, per-class stage accuracy, disagreements."""
import json

import pytest

from hclafter.apps.analysis import MEANINGLESS, analyze_run, format_markdown
from hclafter.apps.cli import main

from .conftest import TINY_CONFIG

SMALL = ["data.synthetic.per_class=8", "text.steps=30",
         "train.phases=[{epochs: 1, train: [stage_adapters, fusion, classifier]}]"]
SECTIONS = ("## Linear probes per block beside the trained stages", "## Per-stage per-class test accuracy",
            "## Where stages disagree")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(run), "--quiet", f"cache_dir={cache_dir}", *SMALL]) == 0
    assert main(["analyze", str(run), "--quiet"]) == 0
    return run


def test_analyze_writes_table_json_curve_and_plot(analysed):
    out = analysed / "analysis"
    for name in ("analysis.md", "analysis.json", "probe_curve.csv", "probe.png", "probe.svg"):
        assert (out / name).stat().st_size > 0, name
    curve = (out / "probe_curve.csv").read_text().splitlines()
    assert curve[0] == "block,probe_accuracy" and [int(line.split(",")[0]) for line in curve[1:]] == list(range(1, 13))
    assert (out / "probe.svg").read_text().lstrip().startswith("<?xml")
    table = (out / "analysis.md").read_text()
    assert all(section in table for section in SECTIONS)
    assert MEANINGLESS in table  # the tiny config's backbone is random-initialised


def test_analysis_matches_the_run(analysed):
    result = json.loads((analysed / "analysis" / "analysis.json").read_text())
    summary = json.loads((analysed / "summary.json").read_text())["test"]
    assert result["random_init"] and len(result["probe"]) == 12
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result["probe"])
    assert [s["deepest_block"] for s in result["stages"]] == [7, 9, 12]
    assert [s["test_accuracy"] for s in result["stages"]] == summary["stage_accuracy"]
    breakdown = result["breakdown"]
    # the trained model run again on the test split gives the summary's accuracies
    assert breakdown["all"]["fused"] == pytest.approx(summary["accuracy"])
    assert breakdown["all"]["stages"] == pytest.approx(summary["stage_accuracy"])
    rows = breakdown["per_class"]
    assert [r["class"] for r in rows] == result["classes"]
    for key in ("images", "stages_disagree", "fused_wrong_some_stage_right"):
        assert sum(r[key] for r in rows) == breakdown["all"][key]
    for r in rows:
        assert r["fused_wrong_some_stage_right"] <= r["images"]
        assert max(r["right_by_stage"]) <= r["fused_wrong_some_stage_right"] <= sum(r["right_by_stage"])


def test_analysis_is_deterministic_and_labels_honestly(analysed, tmp_path):
    again = analyze_run(analysed, tmp_path, progress=False)  # features come from the cache this time
    first = json.loads((analysed / "analysis" / "analysis.json").read_text())
    assert json.loads((tmp_path / "analysis.json").read_text()) == first
    assert again["probe"] == first["probe"]
    assert MEANINGLESS not in format_markdown({**first, "random_init": False})
